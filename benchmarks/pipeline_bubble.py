"""Measured pipeline bubble of gpt3d's 1F1B and interleaved schedules, against Megatron's (P-1)/(v*m).

A 2-core CPU cannot time P real compute stages, so each stage's compute is a
sleep (no CPU used): the forward of every chunk sleeps t_f/v per micro-batch
and its backward 2*t_f/v, so a stage's total work is 3*t_f*m whatever v. The
schedule itself is the real one: `gpt3d.parallel.pipeline.forward_backward`
with its warm-up/steady/cool-down phases and batched isend/irecv over gloo.
Bubble fraction as Megatron defines it: (step time - ideal) / ideal.

    python -m benchmarks.pipeline_bubble --pp 4 --micro 4 8 16 --virtual 1 2 --tf 0.05

Run it as a module from the repository root: the processes are spawned by the tests' gloo helper
(tests/support/distributed.py), imported by its package name.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from gpt3d.config import ParallelConfig
from gpt3d.parallel.pipeline import forward_backward
from gpt3d.parallel.state import build_parallel_state

from tests.support import distributed

HIDDEN = (1, 4, 8)   # [b, s, h] of the activations sent between stages: small, so the sleeps dominate


class _Sleep(torch.autograd.Function):
    """Identity whose forward costs t seconds and backward 2t (the usual backward/forward ratio)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: float) -> torch.Tensor:
        ctx.t = t
        time.sleep(t)
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        time.sleep(2 * ctx.t)
        return g, None


class SleepChunk(nn.Module):
    """A model chunk whose forward sleeps; the first stage's chunk 0 starts from the tokens."""

    def __init__(self, t: float, first: bool, last: bool):
        super().__init__()
        self.t, self.first, self.last = t, first, last
        self.w = nn.Parameter(torch.zeros(HIDDEN[-1]))   # gives the first chunk's backward something to reach

    def forward(self, tokens: torch.Tensor, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        x = tokens.float().unsqueeze(-1).expand(HIDDEN) if self.first else hidden   # [b, s, h]
        return _Sleep.apply(x + self.w, self.t)


def sleep_forward_step(chunk: SleepChunk, micro_batch: dict, x: Optional[torch.Tensor]):
    y = chunk(micro_batch["tokens"], x)
    return (None, y.mean()) if chunk.last else (y, None)


def step_worker(rank: int, world: int, cases: list, repeats: int) -> list:
    """Time `repeats` forward_backward steps per (m, v, t_f) case; returns each step's time on this rank."""
    out = []
    for m, v, t_f in cases:
        cfg = ParallelConfig(pipeline_model_parallel_size=world,
                             num_layers_per_virtual_pipeline_stage=1 if v > 1 else None)
        ps = build_parallel_state(cfg, world, rank, torch.device("cpu"))
        chunks = [SleepChunk(t_f / v, first=rank == 0 and c == 0, last=rank == world - 1 and c == v - 1)
                  for c in range(v)]
        mbs = [{"tokens": torch.zeros(HIDDEN[:2], dtype=torch.long),
                "labels": torch.zeros(HIDDEN[:2], dtype=torch.long)} for _ in range(m)]
        times = []
        for i in range(repeats + 1):   # the first step connects the p2p pairs: not timed
            dist.barrier()
            t0 = time.perf_counter()
            forward_backward(chunks, mbs, ps, forward_step=sleep_forward_step, forward_only=False,
                             hidden_shape=HIDDEN, dtype=torch.float32)
            if i:
                times.append(time.perf_counter() - t0)
        out.append(times)
    return out


def measure(pp: int, cases: list, repeats: int = 3) -> list[dict]:
    """One gloo job of `pp` ranks; per case the median over repeats of the slowest rank's step time."""
    per_rank = distributed.run(pp, step_worker, cases, repeats)
    rows = []
    for i, (m, v, t_f) in enumerate(cases):
        step = statistics.median(max(r[i][k] for r in per_rank) for k in range(repeats))
        ideal = 3 * t_f * m
        rows.append({"pp": pp, "m": m, "v": v, "t_f": t_f, "step_s": step, "ideal_s": ideal,
                     "bubble": (step - ideal) / ideal, "theory": (pp - 1) / (v * m)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| P | m | v | schedule | step (s) | ideal 3·t_f·m (s) | measured bubble | (P-1)/(v·m) | "
             "step - theory (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "1F1B" if r["v"] == 1 else "interleaved"
        excess_ms = 1000 * (r["step_s"] - r["ideal_s"] * (1 + r["theory"]))   # p2p and wake-up latency
        lines.append(f"| {r['pp']} | {r['m']} | {r['v']} | {name} | {r['step_s']:.3f} | {r['ideal_s']:.3f} | "
                     f"{r['bubble']:.3f} | {r['theory']:.3f} | {excess_ms:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--virtual", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tf", type=float, default=0.05, help="forward seconds per micro-batch per stage")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    cases = [(m, v, a.tf) for m in a.micro for v in a.virtual]
    print(table(measure(a.pp, cases, a.repeats)))


if __name__ == "__main__":
    main()
