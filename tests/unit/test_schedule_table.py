"""One home for the pipeline's op order: `gpt3d.parallel.pipeline.schedule_ops` is the schedule table the executor
walks and the planner (gpt3d/plan/schedule.py) counts from.

Each stage runs the real `forward_backward` on a thread (tests/support/schedule_trace.py); the forwards and
backwards it logs are exactly the table's, stage by stage. And the executor takes its order from the table,
not from a copy of the rule: a table that visits the micro-batches in another order (the same on every stage)
is run in that order, with the same losses and gradients.
"""
from __future__ import annotations

import pytest

import gpt3d.parallel.pipeline as pipeline
from gpt3d.parallel.pipeline import Op, schedule_ops
from gpt3d.plan import schedule as plan_schedule

from tests.support.schedule_trace import trace_schedule

CASES = [(1, 3, 1), (2, 1, 1), (2, 5, 1), (3, 2, 1), (4, 7, 1), (2, 2, 2), (2, 4, 3), (3, 6, 2), (4, 8, 2)]


def _compute(trace, rank: int) -> list[tuple]:
    return [(e[0], e[1] // trace.pp, e[2]) for e in trace.logs[rank] if e[0] in ("F", "B")]


@pytest.mark.parametrize("pp,m,v", CASES, ids=[f"pp{p}-m{m}-v{v}" for p, m, v in CASES])
def test_each_stage_runs_exactly_the_schedule_table(pp, m, v):
    trace = trace_schedule(pp, m, v)
    assert not trace.errors
    for rank in range(pp):
        assert _compute(trace, rank) == schedule_ops(pp, rank, v, m), f"stage {rank}"
    assert plan_schedule.schedule_ops is schedule_ops   # the planner counts from the same function


@pytest.mark.parametrize("pp,m,v", [(1, 3, 1), (3, 4, 1), (2, 4, 2)])
def test_the_executor_walks_the_table_it_is_given(monkeypatch, pp, m, v):
    straight = trace_schedule(pp, m, v)
    real = pipeline.schedule_ops

    def reversed_micro_batches(*args, **kw):
        return [Op(op.kind, op.chunk, (m - 1 - op.micro) if v == 1 else _swap_rounds(op.micro, pp, m))
                for op in real(*args, **kw)]

    monkeypatch.setattr(pipeline, "schedule_ops", reversed_micro_batches)
    swapped = trace_schedule(pp, m, v)
    assert not swapped.errors
    for rank in range(pp):
        assert _compute(swapped, rank) == reversed_micro_batches(pp, rank, v, m)
        assert _compute(swapped, rank) != _compute(straight, rank)
        for a, b in zip(swapped.grads[rank], straight.grads[rank]):
            assert (a is None and b is None) or bool((a == b).all())
    assert sorted(swapped.losses[-1]) == sorted(straight.losses[-1])


def _swap_rounds(micro: int, pp: int, m: int) -> int:
    """Interleaved: micro-batches travel in rounds of pp; visit the rounds last first (keeps the ring's FIFO)."""
    rounds = m // pp
    return (rounds - 1 - micro // pp) * pp + micro % pp
