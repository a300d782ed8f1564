"""The seed's verification table, produced by a run: each parallel layout vs one process, 20 iterations.

Every layout trains the tiny model (tests/support/curves.py) from the same seed on the
same global batches; the table gives final train and valid loss and the largest
per-iteration difference from the single-process run. tests/distributed/test_layouts.py
asserts on all layouts below, tests/distributed/test_verification.py checks the table in
docs/verification.md against a fresh run, so a stale or hand-typed table fails CI.

    python -m tests.support.verification --update-docs     # from the repository root: rewrites that table
"""
from __future__ import annotations

import argparse
import datetime
import functools
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from tests.support import ROOT, distributed
from tests.support.curves import layout_curve, layout_worker

ITERS = 20
# A layout's curve may differ from one process's only by float64 rounding in another reduction order (~1e-12
# after 20 iterations here, on AVX2 and AVX-512/AMX alike); an error of fp32's size (1e-7) in one reduction
# moves it by >1e-6 (tests/distributed/test_layouts.py::test_a_broken_tp_reduction_is_caught).
TOL = 1e-9
TABLE_DOC = ROOT / "docs" / "verification.md"   # the page that holds the verification table
START, END = "<!-- verification-table:start -->", "<!-- verification-table:end -->"
COMMAND = "python -m tests.support.verification --update-docs"

# world size -> name -> overrides; one spawned job per world size runs all of its layouts in turn
LAYOUTS = {
    2: {
        "dp2-zero1": dict(zero_stage=1),
        "dp2-zero0": dict(zero_stage=0),
        "tp2": dict(tensor_model_parallel_size=2),
        "pp2": dict(pipeline_model_parallel_size=2),
        "pp2-rope-recompute": dict(pipeline_model_parallel_size=2, use_rotary_position_embeddings=True,
                                   recompute_granularity="full"),
        # 4 micro-batches: at PP=2 the interleaved ring's `prev` and `next` are the same peer
        "pp2-interleaved-m4": dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1),
        "pp2-untied": dict(pipeline_model_parallel_size=2, untie_embeddings_and_output_weights=True),
    },
    4: {
        "dp4-zero1": dict(zero_stage=1),
        "tp2-dp2-zero1": dict(tensor_model_parallel_size=2, zero_stage=1),
        "tp4-sp": dict(tensor_model_parallel_size=4, sequence_parallel=True),
        "pp4": dict(pipeline_model_parallel_size=4),
        "pp2-interleaved": dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1),
        "tp2-pp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    },
    8: {
        "3d-tp2-pp2-dp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                               sequence_parallel=True, zero_stage=1),
    },
}
REFERENCE_EXTRA = {"pp2-rope-recompute": dict(use_rotary_position_embeddings=True),
                   "pp2-untied": dict(untie_embeddings_and_output_weights=True)}

# the seed's table: (row label, world size, layout name, TP, PP, DP)
SEED_ROWS = [
    ("ZeRO-1 DP=2", 2, "dp2-zero1", 1, 1, 2),
    ("ZeRO-1 + TP=2", 4, "tp2-dp2-zero1", 2, 1, 2),
    ("ZeRO-1 + TP=2 + PP=2 (3D, +SP)", 8, "3d-tp2-pp2-dp2", 2, 2, 2),
]
COLUMNS = ["layout", "ranks", "TP × PP × DP", "final train loss", "valid loss",
           f"max \\|train loss diff\\| ({ITERS} it.)", "\\|valid loss diff\\|"]


def mismatch(name: str, got: dict, ref: dict) -> Optional[str]:
    """The first place where `got` (a layout's curve) parts from `ref` (one process's) by more than TOL."""
    if len(got["losses"]) != len(ref["losses"]):
        return f"{name}: {len(got['losses'])} iterations vs {len(ref['losses'])}"
    for i, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        if not abs(a - b) <= TOL * max(1.0, abs(b)):
            return f"{name}: iteration {i + 1} loss {a!r} vs single process {b!r}"
    for i, (a, b) in enumerate(zip(got["norms"], ref["norms"])):
        if not abs(a - b) <= TOL * max(1.0, abs(b)):
            return f"{name}: iteration {i + 1} grad norm {a!r} vs single process {b!r}"
    if not abs(got["val"] - ref["val"]) <= TOL * max(1.0, abs(ref["val"])):
        return f"{name}: validation loss {got['val']!r} vs single process {ref['val']!r}"
    return None


@functools.cache
def reference(extra: tuple = ()) -> dict:
    """The single-process curve (in this process, float64), optionally with model overrides."""
    return layout_curve(dict(train_iters=ITERS, **dict(extra)))


def _run(world: int, names: tuple) -> dict:
    results = distributed.run(world, layout_worker, [dict(LAYOUTS[world][n], train_iters=ITERS) for n in names])
    out = {}
    for i, n in enumerate(names):
        out[n] = dict(next(r[i] for r in results if "losses" in r[i]),
                      max_state_bytes=max(r[i]["state_bytes"] for r in results))   # the largest optimizer shard
    return out


@functools.cache
def world_curves(world: int) -> dict:
    """Every layout of `world`, one spawned job; shared by the test files through this cache."""
    return _run(world, tuple(LAYOUTS[world]))


def seed_table(curves: Optional[dict] = None) -> list[dict]:
    """Rows of the seed's table; `curves` (name -> curve) defaults to running just those layouts."""
    ref = reference()
    rows = [{"layout": "single process", "ranks": 1, "shape": "1 × 1 × 1", "train": ref["losses"][-1],
             "valid": ref["val"], "train_diff": None, "valid_diff": None}]
    for label, world, name, tp, pp, dp in SEED_ROWS:
        got = curves[name] if curves else _run(world, (name,))[name]
        assert len(got["losses"]) == len(ref["losses"]) == ITERS
        rows.append({"layout": label, "ranks": world, "shape": f"{tp} × {pp} × {dp}", "train": got["losses"][-1],
                     "valid": got["val"],
                     "train_diff": max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])),
                     "valid_diff": abs(got["val"] - ref["val"])})
    return rows


def render(rows: list[dict]) -> str:
    def diff(x):
        return "—" if x is None else f"{x:.1e}"
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['ranks']} | {r['shape']} | {r['train']:.4f} | {r['valid']:.4f} | "
                     f"{diff(r['train_diff'])} | {diff(r['valid_diff'])} |")
    return "\n".join(lines)


def table_block(text: str) -> str:
    m = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.S)
    if not m:
        raise ValueError(f"{TABLE_DOC} has no {START} ... {END} block")
    return m.group(1)


def parse(block: str) -> list[dict]:
    """The table rows of the docs block, numbers as floats (None for '—')."""
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != len(COLUMNS) or cells[0] in ("layout", "---"):
            continue
        num = [None if c == "—" else float(c) for c in cells[3:]]
        rows.append({"layout": cells[0], "ranks": int(cells[1]), "shape": cells[2], "train": num[0],
                     "valid": num[1], "train_diff": num[2], "valid_diff": num[3]})
    return rows


def update_table(rows: list[dict], path: Path = TABLE_DOC) -> None:
    text = path.read_text()
    old = table_block(text)
    stamp = (f"Produced by `{COMMAND}` on {datetime.date.today().isoformat()} (CPU, gloo, torch "
             f"{torch.__version__}, tiny model, {ITERS} iterations);\n"
             "`tests/distributed/test_verification.py` re-runs it and fails when this table disagrees with the run.")
    path.write_text(text.replace(START + "\n" + old, START + "\n" + render(rows) + "\n\n" + stamp + "\n", 1))


def main() -> None:
    p = argparse.ArgumentParser(description="Run the seed's verification layouts and print (or store) the table.")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the table in {TABLE_DOC.relative_to(ROOT)}")
    a = p.parse_args()
    if a.update_docs:
        try:
            table_block(TABLE_DOC.read_text())    # fail before the run, not after it
        except (OSError, ValueError) as e:
            sys.exit(f"verification.py: error: {e}")
    rows = seed_table()
    print(render(rows))
    if a.update_docs:
        update_table(rows)
        print(f"updated {TABLE_DOC}")


if __name__ == "__main__":
    main()
