"""`gpt3d <command>`: Megatron-style flags over YAML configs.

Flags are generated from the config dataclasses, so every setting has exactly
one name in YAML (`num_layers`) and on the command line (`--num-layers`).
Precedence: dataclass defaults < YAML file < flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable, Optional

import yaml

from .config import SECTIONS, Config, ConfigError, apply_flat, flatten


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are suppressed so only given flags override YAML."""
    parser.add_argument("--config", help="YAML config file (flags override it)")
    for section, klass in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(klass):
            names = [_flag(f), *f.metadata.get("aliases", ())]
            kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help"))
            t = str(f.type).replace("Optional[", "").rstrip("]")
            if t == "bool":
                group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            elif f.name == "data_path":
                group.add_argument(*names, nargs="+", **kw)
            else:
                conv = {"int": int, "float": float}.get(t, str)
                if f.name in ("train_tokens", "lr_warmup_tokens", "lr_decay_tokens"):
                    conv = _int_tokens
                group.add_argument(*names, type=conv, choices=f.metadata.get("choices"),
                                   metavar=f.name.upper() if not f.metadata.get("choices") else None, **kw)


def _int_tokens(text: str) -> int:
    """Token counts are often written 300e9 or 3_000_000_000."""
    return int(float(text.replace("_", "")))


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config()
    if getattr(args, "config", None):
        try:
            with open(args.config) as fh:
                data = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {args.config}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{args.config}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config}: expected a mapping of settings")
        apply_flat(cfg, flatten(data, source=args.config))
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    apply_flat(cfg, flatten(given, source="flags"))
    return cfg


def _train(args: argparse.Namespace) -> int:
    from .train import main as train_main
    return train_main(config_from_args(args))


def _optional_commands(sub) -> None:
    """Commands living in optional modules register themselves if present."""
    import importlib
    for mod in ("data.preprocess", "bench", "tools", "hf", "inference", "plot", "plan.cli"):
        try:
            m = importlib.import_module(f"gpt3d.{mod}")
        except ImportError as e:
            if f"gpt3d.{mod}" not in str(e):
                raise
            continue
        if hasattr(m, "register"):
            m.register(sub)
        else:  # data.preprocess exposes Megatron's argument set
            p = sub.add_parser("preprocess", help="tokenize JSONL into Megatron .bin/.idx")
            m.add_arguments(p)
            p.set_defaults(func=m.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt3d", description="GPT pretraining with 3D parallelism")
    sub = parser.add_subparsers(dest="command", required=True)
    tp = sub.add_parser("train", help="pretrain a GPT model", allow_abbrev=False)
    add_config_flags(tp)
    tp.set_defaults(func=_train)
    _optional_commands(sub)
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable = args.func
    try:
        return int(func(args) or 0)
    except ConfigError as e:
        print(f"gpt3d: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
