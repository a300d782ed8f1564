"""The replicated-dropout hash (gpt3d/parallel/random.py): unsigned 32-bit arithmetic on int32 tensors, the
same bits eager and compiled, the asked-for drop rate, and masks that change with every draw and site."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d.parallel import random as R
from gpt3d.parallel.state import ParallelState

U32 = st.integers(0, 2 ** 32 - 1)


def _mix_ref(x: np.ndarray) -> np.ndarray:
    """lowbias32 in numpy uint32 (wrapping products, logical shifts): the reference."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x21F0AAAD)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x735A2D97)
    return x ^ (x >> np.uint32(15))


def _hash_ref(i: np.ndarray, k1: int, k2: int) -> np.ndarray:
    lo, hi = (i & 0xFFFFFFFF).astype(np.uint32), (i >> 32).astype(np.uint32)
    return _mix_ref(_mix_ref(lo ^ np.uint32(k1)) ^ hi ^ np.uint32(k2)).view(np.int32)


def _i32(k: int) -> torch.Tensor:
    return R._as_int32(torch.tensor(k, dtype=torch.int64))


@fuzz(40)
@given(k1=U32, k2=U32, start=st.integers(0, 2 ** 40))
def test_hash_is_unsigned_32_bit_arithmetic(k1, k2, start):
    with np.errstate(over="ignore"):
        i = np.arange(start, start + 257, dtype=np.int64)
        want = _hash_ref(i, k1, k2)
    got = R.hash_index(torch.from_numpy(i), _i32(k1), _i32(k2))
    assert np.array_equal(got.numpy(), want)
    if start + 257 < 2 ** 31:   # the int32 path (every tensor below 2^31 elements) gives the same bits
        assert torch.equal(R.hash_index(torch.from_numpy(i).to(torch.int32), _i32(k1), _i32(k2)), got)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_mask_has_the_eager_bits(backend):
    """Inductor's generated code computes the same 32-bit patterns (so eager and compiled recomputes agree with
    their forwards, whatever the device's integer overflow rules)."""
    ps = ParallelState()
    rng = R.TPRNG(11, ps)
    shape, draw, site = torch.Size([3, 17, 40]), rng.next_draw(), torch.tensor(9)
    eager = R.keep_mask(shape, ps.device, 0.3, rng.seed, draw, site)
    torch._dynamo.reset()
    compiled = torch.compile(R.keep_mask, backend=backend, fullgraph=True)(shape, ps.device, 0.3, rng.seed, draw,
                                                                          site)
    torch._dynamo.reset()
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate(p):
    """Over 2^20 elements the dropped fraction is p within 5 standard deviations."""
    rng = R.TPRNG(3, ParallelState())
    keep = R.keep_mask(torch.Size([2 ** 20]), torch.device("cpu"), p, rng.seed, rng.next_draw(), 4)
    n = keep.numel()
    assert abs((n - int(keep.sum())) / n - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_masks_change_with_draw_site_and_seed():
    ps = ParallelState()
    a, b = R.TPRNG(3, ps), R.TPRNG(3, ps)
    shape, cpu = torch.Size([64, 64]), torch.device("cpu")
    d0, d1 = a.next_draw(), a.next_draw()
    assert torch.equal(R.keep_mask(shape, cpu, 0.5, a.seed, d0, 4), R.keep_mask(shape, cpu, 0.5, b.seed, d0, 4))
    others = [R.keep_mask(shape, cpu, 0.5, a.seed, d1, 4), R.keep_mask(shape, cpu, 0.5, a.seed, d0, 5),
              R.keep_mask(shape, cpu, 0.5, R.TPRNG(4, ps).seed, d0, 4)]
    base = R.keep_mask(shape, cpu, 0.5, a.seed, d0, 4)
    for m in others:   # about half the elements agree between independent masks at p = 0.5
        assert 0.4 < float((m == base).float().mean()) < 0.6


def test_draw_counter_resumes():
    """The counter is what an exact resume restores: after load_state_dict the next draw is the saved one's."""
    ps = ParallelState()
    a = R.TPRNG(3, ps)
    for _ in range(5):
        a.next_draw()
    state = a.state_dict()
    assert state == {"seed": 3, "counter": 5}
    b = R.TPRNG(3, ps)
    b.load_state_dict(state)
    assert int(b.next_draw()) == int(a.next_draw()) == 5


def test_replicated_dropout_scales_kept_elements():
    rng = R.TPRNG(3, ParallelState())
    x = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    y = R.replicated_dropout(x, 0.25, rng.seed, rng.next_draw(), 0)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.double() / 0.75)
