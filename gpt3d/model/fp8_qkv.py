"""The attention block's QKV linear in FP8 as one function that hands back query, key and value separately.

Why: through torchao's per-linear function (gpt3d/model/fp8.py) the fused QKV output gets its bias in a pass
of its own after the GEMM, and in backward autograd assembles the query, key and value gradients into the
fused layout, which Inductor then reads three times through a strided gather (bias sums, amax, the E5M2
cast into both layouts): ~13 ms a step at 1.3B, more than any other cast FP8 adds (benchmarks/RESULTS.md,
2026-12-06). Returning q, k, v as views of the GEMM's output lets their gradients arrive apart, so two
passes (gpt3d/model/fp8_qkv_triton.py) read them where attention left them; the bias rides in the GEMM's
epilogue. Same recipe as `--fp8-recipe tensorwise` (fp8_mlp.py's casts: torchao's rule and bits for input,
weight and the assembled output gradient), and the same one difference in rounding as the MLP function's
first linears: the bias is added in the GEMM's epilogue. Where the token count is not a multiple of 16 the
per-linear path runs instead.

The gradient ops are custom ops: a torch reference (CPU, and the spec the Triton kernels are checked against
by benchmarks/fp8_qkv_check.py) and the Triton kernels on CUDA.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from ..triton_kernels import triton_kernels
from . import fp8_mlp
from .attention import split_qkv

E4M3, E5M2 = fp8_mlp.E4M3, fp8_mlp.E5M2


def assemble(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """[T, heads, hd], [T, kv, hd] x 2 -> [T, (heads + 2 kv) * hd]: split_qkv's inverse (its gradient)."""
    T, heads, hd = dq.shape
    kv = dk.shape[1]
    return torch.cat([dq.reshape(T, kv, heads // kv, hd), dk.reshape(T, kv, 1, hd), dv.reshape(T, kv, 1, hd)],
                     dim=2).reshape(T, -1)


@torch.library.custom_op("gpt3d::fp8_qkv_stats", mutates_args=())
def qkv_stats(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, sums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, and with `sums` the column sums (else empty)) of the assembled gradient, in fp32 (or its precision,
    if higher)."""
    g = assemble(dq, dk, dv).to(torch.promote_types(dq.dtype, torch.float32))
    return g.abs().amax(), (g.sum(0) if sums else g.new_empty(0))


@qkv_stats.register_fake
def _(dq, dk, dv, sums):
    n, op = (dq.shape[1] + 2 * dk.shape[1]) * dq.shape[2], torch.promote_types(dq.dtype, torch.float32)
    return dq.new_empty((), dtype=op), dq.new_empty(n if sums else 0, dtype=op)


@torch.library.custom_op("gpt3d::fp8_qkv_cast", mutates_args=())
def qkv_cast(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, scale: torch.Tensor,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The assembled gradient scaled and cast to `dtype`: row-major and transposed copies."""
    q = fp8_mlp.quantize(assemble(dq, dk, dv), scale, dtype)
    return q, q.t().clone(memory_format=torch.contiguous_format)


@qkv_cast.register_fake
def _(dq, dk, dv, scale, dtype):
    T, n = dq.shape[0], (dq.shape[1] + 2 * dk.shape[1]) * dq.shape[2]
    return dq.new_empty((T, n), dtype=dtype), dq.new_empty((n, T), dtype=dtype)


def _register_triton(k) -> bool:
    @qkv_stats.register_kernel("cuda")
    def _(dq, dk, dv, sums):
        return k.stats(dq, dk, dv, sums)

    @qkv_cast.register_kernel("cuda")
    def _(dq, dk, dv, scale, dtype):
        return k.cast(dq, dk, dv, scale, dtype)
    return True


_KERNELS = triton_kernels(".fp8_qkv_triton", __package__)
if _KERNELS is not None:
    _register_triton(_KERNELS)


class _QKV(torch.autograd.Function):
    """q, k, v = split(x W^T + b) on [tokens, features] tensors, its GEMMs in FP8; q [T, heads, hd], k and v
    [T, kv, hd] (views of the GEMM's output where a kv group holds one query head)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], kv: int, hd: int,
                fast: tuple[bool, bool, bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = x.dtype
        x8, x8_t, inv_x = fp8_mlp.cast(x, E4M3)
        w8, w8_t, inv_w = fp8_mlp.cast_weight(w)
        y = fp8_mlp.scaled_mm(x8, w8.t(), inv_x, inv_w, dt, fast[0], None if b is None else b.to(dt))
        ctx.save_for_backward(x8_t, inv_x, w8_t, inv_w)
        ctx.fast, ctx.dtypes = fast, (w.dtype, None if b is None else b.dtype)
        return split_qkv(y, kv, hd)

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple:
        x8_t, inv_x, w8_t, inv_w = ctx.saved_tensors
        (_, fast_dgrad, fast_wgrad), (t_w, t_b) = ctx.fast, ctx.dtypes
        amax, db = qkv_stats(dq, dk, dv, t_b is not None)
        scale = fp8_mlp.to_scale(amax, E5M2)
        g8, g8_t = qkv_cast(dq, dk, dv, scale, E5M2)
        inv_g = scale.reciprocal()
        dx = fp8_mlp.scaled_mm(g8, w8_t.t(), inv_g, inv_w, dq.dtype, fast_dgrad)    # [T, N] @ [N, H]
        dw = fp8_mlp.scaled_mm(g8_t, x8_t.t(), inv_g, inv_x, t_w, fast_wgrad)       # [N, T] @ [T, H]
        return dx, dw, (None if t_b is None else db.to(t_b)), None, None, None


class Float8QKV:
    """`qkv(x, weight, bias, kv_heads, head_dim)` = (q, k, v) of the QKV linear's local GEMM, one FP8 function.

    `fallback(x, weight, bias)` (the per-linear FP8 GEMM, whose output is split the same way) serves token
    counts FP8's weight-gradient GEMM cannot take."""

    def __init__(self, fast: tuple[bool, bool, bool], fallback: Callable[..., torch.Tensor]):
        """fast: fast (lower-precision) accumulation in the forward, input-gradient, weight-gradient GEMMs."""
        self.fast, self.fallback = fast, fallback

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kv: int,
                 hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        if x2.shape[0] % 16:
            return split_qkv(self.fallback(x2, weight, bias), kv, hd)
        return _QKV.apply(x2, weight, bias, kv, hd, self.fast)
