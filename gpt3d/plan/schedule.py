"""The planner's model of gpt3d's pipeline schedules: micro-batches in flight and step time.

Why its own module: memory needs how many micro-batches each stage holds at
once and timing needs the bubble; both follow from the order in which
`gpt3d.parallel.pipeline` runs forwards and backwards, which this module takes
from the executor's own `schedule_ops` (it does not restate it).
tests/distributed/test_plan_schedule.py records that order from the real
`forward_backward` on gloo and checks these functions against it.
"""
from __future__ import annotations

import functools

from ..parallel.pipeline import Op, schedule_ops

__all__ = ["Op", "schedule_ops", "in_flight", "peak_in_flight", "bubble_fraction", "pipeline_time"]


def in_flight(ops: list[Op], chunks: int) -> tuple[int, list[int]]:
    """(most chunk-micro-batches alive at once, most alive per chunk): forwards whose backward has not run."""
    alive, per, most, most_per = 0, [0] * chunks, 0, [0] * chunks
    for kind, c, _ in ops:
        step = 1 if kind == "F" else -1
        alive += step
        per[c] += step
        most = max(most, alive)
        most_per[c] = max(most_per[c], per[c])
    return most, most_per


def peak_in_flight(pp: int, rank: int, vp: int, m: int, chunk_bytes: list[float]) -> float:
    """Largest activation bytes alive on stage `rank`, given one micro-batch's bytes for each of its chunks
    (1F1B: the warm-up forwards and one more, min(pp - rank, m) micro-batches)."""
    if vp == 1:   # one chunk: the most micro-batches alive, times one's bytes. The count stops growing after
        # the warm-up (steady state: one in, one out), so pp micro-batches' table gives it for any m
        return _most_alive(pp, rank, min(m, pp)) * chunk_bytes[0]
    return _peak(pp, rank, vp, m, tuple(chunk_bytes))


@functools.lru_cache(maxsize=4096)
def _most_alive(pp: int, rank: int, m: int) -> int:
    return in_flight(schedule_ops(pp, rank, 1, m), 1)[0]


@functools.lru_cache(maxsize=4096)
def _peak(pp: int, rank: int, vp: int, m: int, chunk_bytes: tuple) -> float:
    alive = most = 0.0
    for kind, c, _ in schedule_ops(pp, rank, vp, m):
        alive += chunk_bytes[c] if kind == "F" else -chunk_bytes[c]
        most = max(most, alive)
    return most


def bubble_fraction(pp: int, vp: int, m: int) -> float:
    """Megatron's idle fraction of equal stages: (pp - 1) / (vp * m), relative to the ideal step."""
    return (pp - 1) / (vp * m) if pp > 1 else 0.0


def pipeline_time(stage_times: list[float], m: int, vp: int) -> float:
    """Forward + backward time of one step, from each stage's time per micro-batch (all its chunks).

    1F1B: the fill and drain pass every stage once, the steady state runs at the slowest stage:
    sum + (m - 1) * max. Interleaved: m * max + (pp - 1) / vp * mean. Equal stages give
    (1 + bubble_fraction) * m * t either way."""
    pp = len(stage_times)
    if pp == 1:
        return m * stage_times[0]
    if vp == 1:
        return sum(stage_times) + (m - 1) * max(stage_times)
    return m * max(stage_times) + (pp - 1) / vp * sum(stage_times) / pp
