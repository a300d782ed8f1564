"""`gpt3d train`: pretrain a GPT model from the config's flags (every setting, generated from the schema)."""
from __future__ import annotations

import argparse
import os

from ..config.flags import add_config_flags
from ..config.load import load_config


def register(sub) -> None:
    p = sub.add_parser("train", help="pretrain a GPT model", allow_abbrev=False)
    add_config_flags(p)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from ..train import main as train_main
    cfg = load_config(args)
    if cfg.training.run_name is None and getattr(args, "config", None):   # the run is named after its config
        cfg.training.run_name = os.path.splitext(os.path.basename(args.config))[0]
    return train_main(cfg)
