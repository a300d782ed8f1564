"""The FP8 functions' custom ops (gpt3d/model/fp8_mlp.py, fp8_qkv.py): each one's fake (what torch.compile
traces with) agrees with its reference in shapes, dtypes and strides, its schema is honest (no input mutated or
aliased), and it traces; torch.library.opcheck checks all of these for a sample of each op's inputs. A wrong
fake would break the compiled model only on the GPU, where these ops have Triton kernels and CI cannot look."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from tests.support.fuzz import fuzz

from gpt3d.model import fp8_mlp as M
from gpt3d.model import fp8_qkv as Q

CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
FP8_CHECKS = CHECKS[1:]


def _cases(rows: int, cols: int, heads: int, kv: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)
    t, da, u = r(rows, cols), r(rows, cols), r(rows, cols)
    scale, scales = torch.tensor(3.0), torch.tensor([3.0, 5.0])
    dq, dk, dv = r(rows, heads * kv, 16), r(rows, kv, 16), r(rows, kv, 16)
    return [
        (M.gelu_stats, (t, None, False)), (M.gelu_stats, (t, da, True)),
        (M.gelu_cast, (t, None, scale, True, M.E4M3)), (M.gelu_cast, (t, da, scale, False, M.E5M2)),
        (M.swiglu_stats, (t, u, None, False)), (M.swiglu_stats, (t, u, da, True)),
        (M.swiglu_cast, (t, u, None, scales, M.E4M3)), (M.swiglu_cast, (t, u, da, scales, M.E5M2)),
        (Q.qkv_stats, (dq, dk, dv, True)), (Q.qkv_stats, (dq, dk, dv, False)),
        (Q.qkv_cast, (dq, dk, dv, scale, M.E5M2)),
        # FP8 inputs: the schema check's bitwise comparison has no CPU kernel for FP8 (FP8_CHECKS)
        (M.swiglu_dgrad, (r(rows, 16).to(M.E5M2), r(cols, 16).to(M.E4M3), scale, scale, t, u)),
        (M.cast_pair, (t, u, scales, M.E5M2)),
    ]


@fuzz(5)
@given(rows=st.integers(1, 20), cols=st.integers(1, 24), heads=st.integers(1, 3), kv=st.integers(1, 3),
       seed=st.integers(0, 2 ** 31 - 1))
def test_every_operator_passes_opcheck(rows, cols, heads, kv, seed):
    cases = _cases(rows, cols, heads, kv, seed)
    names = {op._qualname for op, _ in cases}
    assert names == {f"gpt3d::{n}" for n in dir(torch.ops.gpt3d) if n.startswith("fp8_")}   # every op sampled
    for op, args in cases:
        fp8_in = any(isinstance(a, torch.Tensor) and a.element_size() == 1 for a in args)
        torch.library.opcheck(op, args, test_utils=FP8_CHECKS if fp8_in else CHECKS)


def test_a_wrong_fake_is_caught():
    """The check above has teeth: an op whose fake disagrees with its reference fails it."""
    @torch.library.custom_op("gpt3d_test::wrong_fake", mutates_args=())
    def wrong(t: torch.Tensor) -> torch.Tensor:
        return t.t().contiguous()

    @wrong.register_fake
    def _(t):
        return t.new_empty(t.shape)
    with pytest.raises(Exception, match="(?i)shape|stride|size"):
        torch.library.opcheck(wrong, (torch.randn(2, 3),), test_utils=CHECKS)
