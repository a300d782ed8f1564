"""The 1F1B and interleaved schedules reach Megatron's bubble (P-1)/(v*m) exactly, by their order of operations.

The real `forward_backward` runs on P stage threads with in-process point-to-point (tests/support/schedule_trace.py);
each stage's log of forwards, backwards, sends and receives is replayed on a simulated clock (forward 1 unit,
backward 2, free messages), so the result depends on the schedule alone, not on how busy the machine is.
Wall-clock bubble measurements live in benchmarks/pipeline_bubble.py.
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from tests.support.schedule_trace import HIDDEN, Trace, trace_schedule

CASES = [(4, 8, 1), (4, 16, 1), (2, 8, 1), (4, 3, 1), (4, 8, 2), (4, 16, 2), (2, 4, 2), (4, 4, 2), (4, 12, 3)]


def _ops(trace: Trace, stage: int, kind: str) -> list:
    return [ev[1:3] for ev in trace.logs[stage] if ev[0] == kind]


@pytest.mark.parametrize("pp,m,v", CASES, ids=lambda x: str(x))
def test_schedule_bubble_is_megatrons(pp, m, v):
    trace = trace_schedule(pp, m, v)
    assert trace.errors == []   # every chunk got the right micro-batch from the right stage; no stray messages
    assert trace.bubble() == Fraction(pp - 1, v * m), (trace.bubble(), Fraction(pp - 1, v * m))


@pytest.mark.parametrize("pp,m,v", CASES, ids=lambda x: str(x))
def test_schedule_order_memory_and_gradients(pp, m, v):
    trace = trace_schedule(pp, m, v)
    for r in range(pp):
        every = sorted((c * pp + r, i) for c in range(v) for i in range(m))
        assert sorted(_ops(trace, r, "F")) == every and sorted(_ops(trace, r, "B")) == every
        # 1F1B's point: stage r holds at most its warm-up + 1 micro-batches' activations, not all m (GPipe)
        warmup = pp - r - 1 if v == 1 else 2 * (pp - r - 1) + (v - 1) * pp
        bound = m * v if (v > 1 and m == pp) else min(m * v, warmup + 1)
        assert trace.in_flight(r) <= bound, (r, trace.in_flight(r), bound)
        # only the last micro-batch's backward runs outside no_sync (gradient reduction starts there)
        assert [ev[2] == m - 1 for ev in trace.logs[r] if ev[0] == "B"] == \
            [ev[3] for ev in trace.logs[r] if ev[0] == "B"]
        # loss / m per micro-batch, mean over h: every chunk's weight gets 1/h per element
        assert all(g is not None and torch.allclose(g, torch.full_like(g, 1.0 / HIDDEN[-1]))
                   for g in trace.grads[r]), trace.grads[r]
    assert trace.losses[-1] == [(i + pp * v) / HIDDEN[-1] for i in range(m)]
    assert trace.mean_loss[-1] == pytest.approx(sum(trace.losses[-1]) / m)
    assert all(x == [] for x in trace.losses[:-1]) and all(x is None for x in trace.mean_loss[:-1])


@pytest.mark.parametrize("pp,m,v", [(4, 8, 1), (4, 8, 2)], ids=lambda x: str(x))
def test_forward_only_runs_every_forward_and_no_backward(pp, m, v):
    trace = trace_schedule(pp, m, v, forward_only=True)
    assert trace.errors == []
    for r in range(pp):
        assert sorted(_ops(trace, r, "F")) == sorted((c * pp + r, i) for c in range(v) for i in range(m))
        assert _ops(trace, r, "B") == []
    assert trace.losses[-1] == [(i + pp * v) / HIDDEN[-1] for i in range(m)]


def test_simulated_clock_waits_for_sends():
    """The replay itself: a receive starts no earlier than its send; compute is charged 1 (F) and 2 (B)."""
    logs = [[("F", 0, 0), ("send", 1, 0), ("recv", 1, 0), ("B", 0, 0, True)],
            [("recv", 0, 0), ("F", 1, 0), ("B", 1, 0, True), ("send", 0, 0)]]
    t = Trace(pp=2, v=1, m=1, logs=logs, losses=[[], []], mean_loss=[None, None], grads=[[], []])
    assert t.simulate() == [6, 4] and t.bubble() == Fraction(1, 1)
    with pytest.raises(AssertionError, match="deadlock"):
        Trace(pp=2, v=1, m=1, logs=[[("recv", 1, 0)], [("recv", 0, 0)]], losses=[], mean_loss=[],
              grads=[]).simulate()
