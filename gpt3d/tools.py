"""`gpt3d checkpoint-info`: what a checkpoint holds, in a few lines."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("checkpoint-info", help="print a checkpoint's layout, iteration, tokens and size")
    p.add_argument("path", help="checkpoint root (uses `latest`) or one iter_XXXXXXX directory")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import describe
    print(describe(args.path))
    return 0
