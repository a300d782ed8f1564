"""The GeLU MLP's two FP8 GEMMs as one autograd function, so its casts can be written for bandwidth.

Why: with torchao's per-linear function (gpt3d/model/fp8.py) the casts between the two GEMMs -- GeLU ->
E4M3 for fc2's input, and in backward the GeLU gradient -> E5M2 in both layouts for fc1's two backward
GEMMs -- are Inductor kernels running at ~1 TB/s, the largest cost FP8 adds (benchmarks/RESULTS.md,
2026-12-06). Owning fc1 -> GeLU -> fc2 lets those casts be two passes each of Triton kernels
(gpt3d/model/fp8_gelu_triton.py) that also write the transposed copy the weight-gradient GEMM needs,
with the bias gradient summed on the way. Same recipe as `--fp8-recipe tensorwise`: one dynamic scale
per tensor from its amax (torchao's rule and bits for input, weights and fc2's output gradient; the GeLU
output and gradient rounded to the model precision first, as the unfused model stores them), E4M3
forward, E5M2 gradients, fast accumulation in the forward GEMMs only. The TP communication stays in the
TP layers; this is their local GEMM work. Where the token count is not a multiple of 16 (the weight-gradient
GEMMs' inner dimension) the per-linear path runs instead.

The two GeLU ops (stats, cast; each with a forward and a backward mode) are custom ops: a torch reference
(CPU, and the spec the Triton kernels are checked against by benchmarks/fp8_mlp_check.py) and the Triton
kernels on CUDA; torch.compile keeps them whole. On CPU (tests) the GEMMs are torch's CPU `_scaled_mm`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
EPS = 1e-12   # torchao's floor on an amax (float8_utils.EPS)


def to_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torchao's amax_to_scale: FP8 max / amax in float64, then float32 (eager and compiled agree)."""
    return (torch.finfo(dtype).max / torch.clamp(amax.to(torch.float64), min=EPS)).to(torch.float32)


def quantize(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = torch.finfo(dtype).max
    return (t.to(torch.float32) * scale).clamp(-m, m).to(dtype)


def cast(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FP8 data, the same transposed and contiguous, inverse scale) of a 2-D tensor, torchao's tensorwise
    cast: scale from the flat amax."""
    scale = to_scale(t.abs().max(), dtype)
    q = quantize(t, scale, dtype)
    return q, q.t().contiguous(), scale.reciprocal()


def _gelu_value(h: torch.Tensor, da: Optional[torch.Tensor], tanh: bool) -> torch.Tensor:
    """GeLU(h) or da * GeLU'(h) in fp32 (or h's precision, if higher), rounded to h's precision."""
    approximate, opmath = "tanh" if tanh else "none", torch.promote_types(h.dtype, torch.float32)
    if da is None:
        v = F.gelu(h.to(opmath), approximate=approximate)
    else:
        v = torch.ops.aten.gelu_backward(da.to(opmath), h.to(opmath), approximate=approximate)
    return v.to(h.dtype).to(opmath)


@torch.library.custom_op("gpt3d::fp8_gelu_stats", mutates_args=())
def gelu_stats(h: torch.Tensor, da: Optional[torch.Tensor], tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, column sums) of GeLU(h) (da None; the sums then empty) or of da * GeLU'(h), in fp32 (or h's
    precision, if higher)."""
    v = _gelu_value(h, da, tanh)
    sums = v.sum(0) if da is not None else v.new_empty(0)
    return v.abs().amax(), sums


@gelu_stats.register_fake
def _(h, da, tanh):
    opmath = torch.promote_types(h.dtype, torch.float32)
    return h.new_empty((), dtype=opmath), h.new_empty(h.shape[1] if da is not None else 0, dtype=opmath)


@torch.library.custom_op("gpt3d::fp8_gelu_cast", mutates_args=())
def gelu_cast(h: torch.Tensor, da: Optional[torch.Tensor], scale: torch.Tensor, tanh: bool,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """GeLU(h) (da None) or da * GeLU'(h), scaled and cast to `dtype`: row-major and transposed copies."""
    q = quantize(_gelu_value(h, da, tanh), scale, dtype)
    return q, q.t().clone(memory_format=torch.contiguous_format)   # a copy even where .t() is contiguous


@gelu_cast.register_fake
def _(h, da, scale, tanh, dtype):
    return h.new_empty(h.shape, dtype=dtype), h.new_empty((h.shape[1], h.shape[0]), dtype=dtype)


def _register_triton() -> bool:
    try:
        from . import fp8_gelu_triton as k
    except ImportError:   # no Triton (CPU wheels): the reference serves every device
        return False

    @gelu_stats.register_kernel("cuda")
    def _(h, da, tanh):
        amax, sums = k.stats(h.contiguous(), None if da is None else da.contiguous(), tanh)
        return amax, (sums if sums is not None else h.new_empty(0, dtype=torch.float32))

    @gelu_cast.register_kernel("cuda")
    def _(h, da, scale, tanh, dtype):
        return k.cast(h.contiguous(), None if da is None else da.contiguous(), scale, tanh, dtype)
    return True


if torch.cuda.is_available():
    _register_triton()


def scaled_mm(a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor, out_dtype: torch.dtype,
              fast_accum: bool, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b of FP8 operands (a row-major, b column-major) with their inverse scales, in out_dtype."""
    return torch._scaled_mm(a, b, scale_a=inv_a, scale_b=inv_b, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


class _GeluMLP(torch.autograd.Function):
    """y = GeLU(x W1^T + b1) W2^T on [tokens, features] tensors, every GEMM in FP8."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                tanh: bool, fast: tuple[bool, bool, bool]) -> torch.Tensor:
        dt = x.dtype
        x8, x8_t, inv_x = cast(x, E4M3)
        w1_8, w1_8t, inv_w1 = cast(w1, E4M3)
        w2_8, w2_8t, inv_w2 = cast(w2, E4M3)
        h = scaled_mm(x8, w1_8.t(), inv_x, inv_w1, dt, fast[0], None if b1 is None else b1.to(dt))
        amax, _ = gelu_stats(h, None, tanh)
        scale_a = to_scale(amax, E4M3)
        a8, a8_t = gelu_cast(h, None, scale_a, tanh, E4M3)
        inv_a = scale_a.reciprocal()
        y = scaled_mm(a8, w2_8.t(), inv_a, inv_w2, dt, fast[0])
        ctx.save_for_backward(x8_t, inv_x, w1_8t, inv_w1, h, a8_t, inv_a, w2_8t, inv_w2)
        ctx.tanh, ctx.fast, ctx.dtypes = tanh, fast, (w1.dtype, w2.dtype, None if b1 is None else b1.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x8_t, inv_x, w1_8t, inv_w1, h, a8_t, inv_a, w2_8t, inv_w2 = ctx.saved_tensors
        dt, (_, fast_dgrad, fast_wgrad) = dy.dtype, ctx.fast
        dy = dy.contiguous()   # row-major, as _scaled_mm's first operand must be
        dy8, dy8_t, inv_dy = cast(dy, E5M2)
        da = scaled_mm(dy8, w2_8t.t(), inv_dy, inv_w2, dt, fast_dgrad)              # [T, H] @ [H, F]
        dw2 = scaled_mm(dy8_t, a8_t.t(), inv_dy, inv_a, ctx.dtypes[1], fast_wgrad)  # [H, T] @ [T, F]
        amax, db1 = gelu_stats(h, da, ctx.tanh)
        scale_g = to_scale(amax, E5M2)
        g8, g8_t = gelu_cast(h, da, scale_g, ctx.tanh, E5M2)
        inv_g = scale_g.reciprocal()
        dx = scaled_mm(g8, w1_8t.t(), inv_g, inv_w1, dt, fast_dgrad)                # [T, F] @ [F, H]
        dw1 = scaled_mm(g8_t, x8_t.t(), inv_g, inv_x, ctx.dtypes[0], fast_wgrad)    # [F, T] @ [T, H]
        return dx, dw1, (None if ctx.dtypes[2] is None else db1.to(ctx.dtypes[2])), dw2, None, None


class Float8GeluMLP:
    """`mlp(x, w1, b1, w2)` = the GeLU MLP's local GEMM work (fc2's bias and TP reduction excluded), FP8.

    `fallback(x, w1, b1, w2)` serves shapes FP8 GEMMs cannot take: the per-linear FP8 path."""

    def __init__(self, tanh: bool, fast: tuple[bool, bool, bool], fallback: Callable[..., torch.Tensor]):
        """fast: fast (lower-precision) accumulation in the forward, input-gradient, weight-gradient GEMMs."""
        self.tanh, self.fast, self.fallback = tanh, fast, fallback

    def __call__(self, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                 w2: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if x2.shape[0] % 16:
            return self.fallback(x, w1, b1, w2)
        y = _GeluMLP.apply(x2, w1, b1, w2, self.tanh, self.fast)
        return y.reshape(*shape[:-1], y.shape[-1])
