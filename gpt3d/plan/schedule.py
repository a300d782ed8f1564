"""The planner's model of gpt3d's pipeline schedules: op order per stage, micro-batches in flight, step time.

Why its own module: memory needs how many micro-batches each stage holds at
once and timing needs the bubble; both follow from the order in which
`gpt3d.parallel.pipeline` runs forwards and backwards. tests/distributed/test_plan_schedule.py
records that order from the real `forward_backward` on gloo and checks these
functions against it.
"""
from __future__ import annotations

import functools


def schedule_ops(pp: int, rank: int, vp: int, m: int) -> list[tuple[str, int, int]]:
    """("F" | "B", model chunk, micro-batch) in the order stage `rank` runs them in one training step.

    1F1B (vp = 1): pp-rank-1 warm-up forwards, then one forward / one backward, then the remaining backwards.
    Interleaved (Megatron): (pp-rank-1)*2 + (vp-1)*pp warm-up forwards (all of them when m == pp); virtual step
    k works on chunk (k mod pp*vp) // pp (reversed for backwards) and micro-batch (k // pp*vp)*pp + k mod pp."""
    if pp == 1:
        return [op for i in range(m) for op in (("F", 0, i), ("B", 0, i))]
    if vp == 1:
        warm = min(pp - rank - 1, m)
        ops = [("F", 0, i) for i in range(warm)]
        for i in range(m - warm):
            ops += [("F", 0, warm + i), ("B", 0, i)]
        return ops + [("B", 0, i) for i in range(m - warm, m)]
    total = m * vp

    def chunk(k: int, forward: bool) -> int:
        c = (k % (pp * vp)) // pp
        return c if forward else vp - 1 - c

    def mb(k: int) -> int:
        return (k // (pp * vp)) * pp + k % pp

    warm = total if m == pp else min(total, (pp - rank - 1) * 2 + (vp - 1) * pp)
    ops = [("F", chunk(k, True), mb(k)) for k in range(warm)]
    for k in range(total - warm):
        ops += [("F", chunk(k + warm, True), mb(k + warm)), ("B", chunk(k, False), mb(k))]
    return ops + [("B", chunk(k, False), mb(k)) for k in range(total - warm, total)]


def in_flight(ops: list[tuple[str, int, int]], chunks: int) -> tuple[int, list[int]]:
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
    """Largest activation bytes alive on stage `rank`, given one micro-batch's bytes for each of its chunks."""
    if vp == 1:   # 1F1B: the warm-up forwards and one more, then one in, one out
        return min(pp - rank if pp > 1 else 1, m) * chunk_bytes[0]
    return _peak_interleaved(pp, rank, vp, m, tuple(chunk_bytes))


@functools.lru_cache(maxsize=4096)
def _peak_interleaved(pp: int, rank: int, vp: int, m: int, chunk_bytes: tuple) -> float:
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
