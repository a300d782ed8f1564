"""`gpt3d plot`: loss curves of one or more runs, the picture compared before and after a change.

Reads the JSON-lines metrics the trainer writes (train rows carry `tokens`, `loss`, `tokens_per_s`;
validation rows `tokens`, `val_loss`) and draws loss against tokens above tokens/s against tokens, one
colour per run. Tokens, not iterations, are on the x axis so runs with different batch sizes line up.
The figure is drawn on a bare Agg canvas (no pyplot), so plotting from the trainer touches no global
matplotlib state and needs no display.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

from ..files.atomic import replacing
from ..errors import PlotError


def _num(v) -> Optional[float]:
    """Finite numbers only: the logger writes non-finite values as strings ('nan', 'inf')."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def read_metrics(path: str) -> dict:
    """{'train': [(tokens, loss)], 'valid': [(tokens, val_loss)], 'speed': [(tokens, tokens/s)]}, sorted.

    The last run of the file: each run starts with a `run_start` row holding the token count it starts from.
    A fresh run (0 tokens) hides everything before it; a resumed run keeps the rows up to its checkpoint's
    token count and replaces the rest (steps the earlier run made after that checkpoint were lost with it).
    Rows of one run with the same token count: the row written last wins."""
    series = {"train": {}, "valid": {}, "speed": {}}
    try:
        with open(path) as fh:
            lines = fh.readlines()
    except FileNotFoundError:
        raise PlotError(f"metrics file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PlotError(f"{path}:{n}: not a JSON line (expected gpt3d --log-file metrics)") from None
        if not isinstance(row, dict):
            raise PlotError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        tokens = _num(row.get("tokens"))
        if tokens is None:
            continue
        if "run_start" in row:
            series = {k: {x: y for x, y in v.items() if 0 < x <= tokens} for k, v in series.items()}
            continue
        for key, name in (("loss", "train"), ("val_loss", "valid"), ("tokens_per_s", "speed")):
            value = _num(row.get(key))
            if value is not None:
                series[name][tokens] = value
    if not series["train"] and not series["valid"]:
        raise PlotError(f"{path}: no loss rows with a token count (not a gpt3d metrics file?)")
    return {k: sorted(v.items()) for k, v in series.items()}


def run_labels(paths: list) -> list:
    """Shortest path suffixes that tell the runs apart: 'a' and 'b' for a.jsonl, b.jsonl;
    'base' and 'swiglu' for runs/base/metrics.jsonl, runs/swiglu/metrics.jsonl."""
    parts = [os.path.normpath(os.path.abspath(os.path.splitext(p)[0])).split(os.sep) for p in paths]
    if len(paths) > 1 and len({p[-1] for p in parts}) == 1:   # same file name everywhere: name the folders
        parts = [p[:-1] for p in parts]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{p} ({i + 1})" for i, p in enumerate(paths)]   # the same file given twice


def plot_runs(paths: list, output: str, title: Optional[str] = None) -> str:
    """Draw every run into one PNG at `output` (written whole, then renamed into place)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    runs = [read_metrics(p) for p in paths]   # every file is checked before anything is drawn
    fig = Figure(figsize=(9, 7), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, speed_ax = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    handles = []
    for i, (label, run) in enumerate(zip(run_labels(paths), runs)):
        color = f"C{i % 10}"
        if run["train"]:
            x, y = zip(*run["train"])
            loss_ax.plot(x, y, color=color, lw=1.2, alpha=0.9)
        if run["valid"]:
            x, y = zip(*run["valid"])
            loss_ax.plot(x, y, color=color, ls="--", marker="o", ms=4, lw=1.2)
        if run["speed"]:
            x, y = zip(*run["speed"])
            speed_ax.plot(x, y, color=color, lw=1.2)
        last = run["valid"][-1][1] if run["valid"] else run["train"][-1][1]
        kind = "valid" if run["valid"] else "train"
        handles.append(Line2D([], [], color=color, lw=2, label=f"{label} (last {kind} {last:.3f})"))
    handles += [Line2D([], [], color="0.3", lw=1.2, label="train loss"),
                Line2D([], [], color="0.3", lw=1.2, ls="--", marker="o", ms=4, label="validation loss")]
    loss_ax.legend(handles=handles, fontsize=8, loc="upper right")
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.set_title(title or "loss vs tokens")
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_xlabel("tokens")
    speed_ax.xaxis.set_major_formatter(EngFormatter())
    speed_ax.yaxis.set_major_formatter(EngFormatter())
    speed_ax.set_ylim(bottom=0)
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
    with replacing(output) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return output

