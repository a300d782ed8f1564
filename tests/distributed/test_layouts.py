"""Every parallel layout trains the same curve as one process (float64, CPU, gloo).

Same seed and the same global batch per iteration: TP, SP, PP (1F1B and interleaved), ZeRO-0/1 data
parallel and their 3D composition must agree with the single-process run in loss and grad norm over 20
iterations and in validation loss, to `verification.TOL`. The runs are in float64, so the only difference
a correct layout can make is float64 rounding in another reduction order — the bound holds on any CPU (AVX2,
AVX-512, AMX), yet an error the size of one fp32 rounding in one TP reduction breaks it. The layouts and the
cached runs live in tests/support/verification.py, shared with the docs table's test (docs/verification.md).
"""
from __future__ import annotations

import pytest

from tests.support import distributed
from tests.support.verification import ITERS, LAYOUTS, REFERENCE_EXTRA, mismatch, reference, world_curves

CASES = [(w, n) for w in LAYOUTS for n in LAYOUTS[w]]


@pytest.mark.slow
@pytest.mark.parametrize("world,name", CASES, ids=[n for _, n in CASES])
def test_layout_matches_single_process(world, name):
    ref = reference(tuple(sorted(REFERENCE_EXTRA.get(name, {}).items())))
    got = world_curves(world)[name]
    assert len(got["losses"]) == len(ref["losses"]) == ITERS
    assert ref["losses"][-1] < ref["losses"][0] - 0.1, "the reference run should learn"
    assert mismatch(name, got, ref) is None, mismatch(name, got, ref)


@pytest.mark.slow
def test_a_broken_tp_reduction_is_caught():
    """The comparison is not blind: TP=2 with a gradient all-reduce left out, or with each TP all-reduce
    off by one fp32 rounding (relative 2^-24), parts from the single process beyond the bound."""
    from tests.support.curves import broken_tp_worker
    ref = reference()
    for kind, got in distributed.run(2, broken_tp_worker, ITERS)[0].items():
        assert mismatch(kind, got, ref) is not None, f"{kind}: the broken TP reduction went unnoticed"


@pytest.mark.slow
def test_zero1_shards_optimizer_state():
    """ZeRO-1 keeps ~1/DP of the optimizer state per rank (measured from the optimizer's tensors)."""
    one = reference()["state_bytes"]
    z1 = world_curves(2)["dp2-zero1"]["max_state_bytes"]
    z0 = world_curves(2)["dp2-zero0"]["max_state_bytes"]
    assert z0 == one
    assert z1 <= one / 2 * 1.05 + 4096, (z1, one)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1])
def test_one_rank_overflow_skips_everywhere(zero):
    from tests.support.curves import overflow_worker
    for r in distributed.run(2, overflow_worker, zero):
        assert r["unchanged"] and r["skipped"] == 1.0 and r["then_steps"], r
