"""Every parallel layout trains the same curve as one process (fp32, CPU, gloo).

Same seed and the same global batch per iteration: TP, SP, PP (1F1B and
interleaved), ZeRO-0/1 data parallel and their 3D composition must agree with
the single-process run to 1e-3 in loss over 20 iterations, and in grad norm. The layouts and
the cached runs live in tests/support/verification.py, shared with the README table's test.
"""
from __future__ import annotations

import pytest

from tests.support import distributed
from tests.support.verification import ITERS, LAYOUTS, REFERENCE_EXTRA, reference, world_curves

CASES = [(w, n) for w in LAYOUTS for n in LAYOUTS[w]]


@pytest.mark.slow
@pytest.mark.parametrize("world,name", CASES, ids=[n for _, n in CASES])
def test_layout_matches_single_process(world, name):
    ref = reference(tuple(sorted(REFERENCE_EXTRA.get(name, {}).items())))
    got = world_curves(world)[name]
    assert len(got["losses"]) == len(ref["losses"]) == ITERS
    assert ref["losses"][-1] < ref["losses"][0] - 0.1, "the reference run should learn"
    for i, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) <= 1e-3, f"{name}: iteration {i + 1} loss {a:.6f} vs single process {b:.6f}"
    for i, (a, b) in enumerate(zip(got["norms"], ref["norms"])):
        assert abs(a - b) <= 1e-3 * max(1.0, b), f"{name}: iteration {i + 1} grad norm {a} vs {b}"
    assert abs(got["val"] - ref["val"]) <= 1e-3


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
