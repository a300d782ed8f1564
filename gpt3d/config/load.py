"""One command's settings, loaded once: dataclass defaults < YAML file (--config) < flags, then Megatron-DeepSpeed's
--deepspeed_config and, for a Megatron-DeepSpeed checkpoint given to --load, the settings its args hold that
nothing else decided.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

from .root import Config
from .values import apply_layer, flatten, read_settings_file


def load_config(args: argparse.Namespace) -> Config:
    """The Config of a command's parsed flags (config/flags.py made them)."""
    cfg = Config()
    yaml_keys: set = set()
    if getattr(args, "config", None):
        data = read_settings_file(args.config, lambda fh: yaml.safe_load(fh) or {}, yaml.YAMLError,
                                  lambda e: f"not valid YAML ({str(e).splitlines()[0]})",
                                  missing=f"config file not found: {args.config}",
                                  expected="expected a mapping of settings")
        flat = flatten(data, source=args.config)
        apply_layer(cfg, flat, source=args.config)
        yaml_keys = set(flat)
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func", "_order")}
    apply_layer(cfg, flatten(given, source="flags"), source="the command line", order=getattr(args, "_order", None))
    from .deepspeed import apply_deepspeed_config   # Megatron-DeepSpeed's --deepspeed_config
    decided = set(given) | yaml_keys | apply_deepspeed_config(cfg, set(given) | yaml_keys)
    if cfg.checkpoint.load:   # a Megatron-DeepSpeed checkpoint's args fill the settings left out
        from ..checkpoint.megatron_deepspeed import apply_settings
        taken = apply_settings(cfg, decided)
        if taken and os.environ.get("RANK", "0") == "0":
            print("gpt3d: from the Megatron-DeepSpeed checkpoint's args: " +
                  " ".join(f"{k}={v}" for k, v in taken.items()), file=sys.stderr)
    return cfg
