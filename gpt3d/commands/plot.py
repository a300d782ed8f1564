"""`gpt3d plot`: loss and tokens/s curves of one or more runs' metrics files (gpt3d/console/plot.py draws them)."""
from __future__ import annotations

import argparse

from ..errors import os_errors_are_user_errors
from .output import emit


def register(sub) -> None:
    p = sub.add_parser("plot", help="train/validation loss and tokens/s vs tokens of one or more runs")
    p.add_argument("metrics", nargs="+", help="JSON-lines metrics files written by `train --log-file`")
    p.add_argument("--output", "-o", default="curves.png", help="PNG to write")
    p.add_argument("--title", default=None, help="figure title (default: none)")
    p.set_defaults(func=run)


@os_errors_are_user_errors
def run(args: argparse.Namespace) -> int:
    from ..console import plot
    emit(f"wrote {plot.plot_runs(args.metrics, args.output, args.title)}")
    return 0
