"""The MLP's FP8 GEMMs (GeLU or SwiGLU) as one autograd function, so its casts can be written for bandwidth.

Why: with torchao's per-linear function (gpt3d/model/fp8.py) the casts between the GEMMs -- the activation
(GeLU, or SiLU(gate) * up) -> E4M3 for fc2's input, and in backward its gradient(s) -> E5M2 in both layouts
for the first linears' backward GEMMs -- are Inductor kernels running at ~1 TB/s, the largest cost FP8 adds
(benchmarks/RESULTS.md, 2026-12-06). Owning the whole MLP lets those casts be two passes each of Triton
kernels (gpt3d/model/fp8_mlp_triton.py) that also write the transposed copy the weight-gradient GEMM needs,
with the bias gradients summed on the way. Same recipe as `--fp8-recipe tensorwise`: one dynamic scale
per tensor from its amax (torchao's rule and bits for input, weights and fc2's output gradient; the
activation and its gradients rounded to the model precision first, as the unfused model stores them), E4M3
forward, E5M2 gradients, fast accumulation in the forward GEMMs only. One difference in rounding: the first
linears' biases are added in the GEMM's epilogue (one rounding to bf16), where the per-linear path rounds
the GEMM's output and then adds the bias. The TP communication stays in the
TP layers; this is their local GEMM work. Where the token count is not a multiple of 16 (the weight-gradient
GEMMs' inner dimension) the per-linear path runs instead.

A SwiGLU MLP's backward can skip writing da altogether where quack-kernels loads (`dgrad_epilogue_loads`):
the down projection's input-gradient GEMM computes d up, d gate and their amaxes in its epilogue
(`swiglu_dgrad`, model/quack_gemm.py), and one pass casts the two gradients (`cast_pair`), instead of the
stats and cast passes each reading g, u and da. Its rounding differs: only the two final gradients are rounded
to bf16 (the path above also rounds da, SiLU(g), da * u and SiLU's backward on the way), and a NaN gradient
does not make the amax NaN (the epilogue's max drops NaN; the NaN entries still cast to NaN). On one H100 it
passed its check but ran slow with quack's default tile (session 45); model/quack_gemm.py says why and what
tile it runs now, with which the GEMM and the cast take 566 us a layer against 598 us per linear, and a
Llama 4x1 step 1.7% less (benchmarks/RESULTS.md, session 47). So a SwiGLU MLP runs as this function by default
where the epilogue loads (model/fp8.py), per linear elsewhere. `benchmarks/fp8_mlp_check.py --only epilogue`
checks and times it, `profile_step.py` options `fp8s` / `fp8u` force the function / per linear.

The activation ops (stats, cast; each with a forward and a backward mode; GeLU and SwiGLU) are custom ops:
a torch reference (CPU, and the spec the Triton kernels are checked against by benchmarks/fp8_mlp_check.py)
and the Triton kernels on CUDA; torch.compile keeps them whole. On CPU (tests) the GEMMs are torch's CPU
`_scaled_mm`.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..triton_kernels import triton_kernels
from . import quack_gemm

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
    q, q_t, _, inv = cast_with_scale(t, dtype)
    return q, q_t, inv


class ScaledCast(NamedTuple):
    """`cast_with_scale`'s result, and what a weight carries while model/fp8_weights.py holds its cast."""
    data: torch.Tensor
    data_t: Optional[torch.Tensor]   # the data transposed and contiguous; None where not asked for
    scale: torch.Tensor
    inv_scale: torch.Tensor


def cast_with_scale(t: torch.Tensor, dtype: torch.dtype, transposed: bool = True) -> ScaledCast:
    """`cast`'s data, transposed data (None without `transposed`) and inverse scale, with the scale itself
    (torchao's tensors hold it)."""
    scale = to_scale(t.abs().max(), dtype)
    q = quantize(t, scale, dtype)
    return ScaledCast(q, q.t().contiguous() if transposed else None, scale, scale.reciprocal())


# the attribute a weight carries while model/fp8_weights.py holds its cast: cast_with_scale(weight, E4M3, ...)
WEIGHT_CAST = "_gpt3d_fp8_cast"


def held_cast(w: torch.Tensor) -> Optional[ScaledCast]:
    """The FP8 cast of weight `w` held for this step (model/fp8_weights.py), or None."""
    return getattr(w, WEIGHT_CAST, None)


def cast_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cast(w, E4M3)` of a weight: the copy cast once for the step where model/fp8_weights.py holds one (the
    same bits; transposed here if it was held without), else cast here."""
    held = held_cast(w)
    if held is None:
        return cast(w, E4M3)
    return held.data, held.data_t if held.data_t is not None else held.data.t().contiguous(), held.inv_scale


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


def _swiglu_values(g: torch.Tensor, u: torch.Tensor, da: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """[SiLU(g) * u], or its gradients [d u, d g] from da, rounded to g's precision where the unfused model
    stores a tensor (SiLU(g), the product; da * SiLU(g), da * u, SiLU's backward), returned in fp32 (or g's
    precision, if higher)."""
    op, dt = torch.promote_types(g.dtype, torch.float32), g.dtype
    s = F.silu(g.to(op)).to(dt).to(op)
    if da is None:
        return [(s * u.to(op)).to(dt).to(op)]
    du = (da.to(op) * s).to(dt).to(op)
    ds = (da.to(op) * u.to(op)).to(dt).to(op)
    return [du, torch.ops.aten.silu_backward(ds, g.to(op)).to(dt).to(op)]


@torch.library.custom_op("gpt3d::fp8_swiglu_stats", mutates_args=())
def swiglu_stats(g: torch.Tensor, u: torch.Tensor, da: Optional[torch.Tensor],
                 sums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """amax of SiLU(g) * u ([1]), or of its gradients (d u, d g) ([2]) and, with `sums`, their column sums
    ([2, F]; else empty)."""
    v = _swiglu_values(g, u, da)
    total = torch.stack([x.sum(0) for x in v]) if da is not None and sums else v[0].new_empty(0)
    return torch.stack([x.abs().amax() for x in v]), total


@swiglu_stats.register_fake
def _(g, u, da, sums):
    op = torch.promote_types(g.dtype, torch.float32)
    total = (2, g.shape[1]) if da is not None and sums else (0,)
    return g.new_empty(1 if da is None else 2, dtype=op), g.new_empty(total, dtype=op)


@torch.library.custom_op("gpt3d::fp8_swiglu_cast", mutates_args=())
def swiglu_cast(g: torch.Tensor, u: torch.Tensor, da: Optional[torch.Tensor], scale: torch.Tensor,
                dtype: torch.dtype) -> list[torch.Tensor]:
    """[a, a transposed] (da None) or [d u, its transpose, d g, its transpose], value i scaled by scale[i]."""
    return _both_layouts(_swiglu_values(g, u, da), scale, dtype)


def _both_layouts(values, scale: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """[v0 cast, v0 cast and transposed (contiguous), v1 cast, ...], value i scaled by scale[i]."""
    out = []
    for i, v in enumerate(values):
        q = quantize(v, scale[i], dtype)
        out += [q, q.t().clone(memory_format=torch.contiguous_format)]
    return out


@swiglu_cast.register_fake
def _(g, u, da, scale, dtype):
    T, F_ = g.shape
    return [g.new_empty(s, dtype=dtype) for s in ((T, F_), (F_, T)) * (1 if da is None else 2)]


def _dswiglu_values(da: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> list[torch.Tensor]:
    """[d u, d g] of SiLU(g) * u from da, computed in fp32 (or higher) and rounded once, to g's dtype."""
    op = torch.promote_types(g.dtype, torch.float32)
    gf, uf, d = g.to(op), u.to(op), da.to(op)
    sig = torch.sigmoid(gf)
    return [(d * (gf * sig)).to(g.dtype), (d * uf * (sig * (1 + gf * (1 - sig)))).to(g.dtype)]


@torch.library.custom_op("gpt3d::fp8_swiglu_dgrad", mutates_args=())
def swiglu_dgrad(dy8: torch.Tensor, w2_8t: torch.Tensor, inv_dy: torch.Tensor, inv_w2: torch.Tensor,
                 g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d up, d gate, their amaxes [2]) from the down projection's input gradient da = dy8 @ w2_8t^T (FP8, fp32
    accumulation without fast accumulation), da not rounded on the way: the spec of quack's GEMM with SwiGLU's
    backward and the amaxes in its epilogue (model/quack_gemm.py), which writes no da."""
    return _swiglu_dgrad_ref(dy8, w2_8t, inv_dy, inv_w2, g, u)


def _swiglu_dgrad_ref(dy8, w2_8t, inv_dy, inv_w2, g, u) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = torch.promote_types(g.dtype, torch.float32)
    du, dg = _dswiglu_values(scaled_mm(dy8, w2_8t.t(), inv_dy, inv_w2, op, False), g, u)
    return du, dg, torch.stack([du.abs().amax(), dg.abs().amax()]).to(op)


@swiglu_dgrad.register_fake
def _(dy8, w2_8t, inv_dy, inv_w2, g, u):
    op = torch.promote_types(g.dtype, torch.float32)
    return (torch.empty_like(g, memory_format=torch.contiguous_format),
            torch.empty_like(g, memory_format=torch.contiguous_format), g.new_empty(2, dtype=op))


@torch.library.custom_op("gpt3d::fp8_cast_pair", mutates_args=())
def cast_pair(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """[a, a transposed, b, b transposed], a scaled by scale[0] and b by scale[1], cast to `dtype`."""
    return _both_layouts((a, b), scale, dtype)


@cast_pair.register_fake
def _(a, b, scale, dtype):
    T, F_ = a.shape
    return [a.new_empty(s, dtype=dtype) for s in ((T, F_), (F_, T)) * 2]


def _register_triton(k) -> bool:
    @gelu_stats.register_kernel("cuda")
    def _(h, da, tanh):
        amax, sums = k.stats(h.contiguous(), None if da is None else da.contiguous(), tanh)
        return amax, (sums if sums is not None else h.new_empty(0, dtype=torch.float32))

    @gelu_cast.register_kernel("cuda")
    def _(h, da, scale, tanh, dtype):
        return k.cast(h.contiguous(), None if da is None else da.contiguous(), scale, tanh, dtype)

    @swiglu_stats.register_kernel("cuda")
    def _(g, u, da, sums):
        amax, total = k.swiglu_stats(g.contiguous(), u.contiguous(), None if da is None else da.contiguous(), sums)
        return amax, (total if total is not None else g.new_empty(0, dtype=torch.float32))

    @swiglu_cast.register_kernel("cuda")
    def _(g, u, da, scale, dtype):
        return k.swiglu_cast(g.contiguous(), u.contiguous(), None if da is None else da.contiguous(),
                             scale.contiguous(), dtype)

    @cast_pair.register_kernel("cuda")
    def _(a, b, scale, dtype):
        return k.cast_pair(a.contiguous(), b.contiguous(), scale.contiguous(), dtype)
    return True


_QUACK_FAILED: list[str] = []   # quack's epilogue raised once (e.g. its first compile): the reference serves since


def _swiglu_dgrad_quack(dy8, w2_8t, inv_dy, inv_w2, g, u) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """swiglu_dgrad on CUDA: quack's epilogue, else the reference."""
    if not _QUACK_FAILED:
        try:
            got = quack_gemm.mm_dswiglu_amax(dy8, w2_8t.t(), inv_dy, inv_w2, g, u)
        except Exception as e:   # noqa: BLE001 (a third-party kernel's error: the reference computes the same)
            _QUACK_FAILED.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"gpt3d: quack's SwiGLU-gradient epilogue raised {_QUACK_FAILED[0]}; its reference (slower) "
                          "serves from now on", RuntimeWarning, stacklevel=2)
        else:
            if got is not None:
                return got
    # operands quack declines (e.g. misaligned) or a failed quack: the reference, eager
    return _swiglu_dgrad_ref(dy8, w2_8t, inv_dy, inv_w2, g, u)


swiglu_dgrad.register_kernel("cuda")(_swiglu_dgrad_quack)


_KERNELS = triton_kernels(".fp8_mlp_triton", __package__)
if _KERNELS is not None:
    _register_triton(_KERNELS)


def dgrad_epilogue_loads(device: torch.device) -> bool:
    """Whether a SwiGLU MLP's backward on `device` can run the down projection's input-gradient GEMM with
    SwiGLU's backward and the amaxes in its epilogue (`swiglu_dgrad`: quack-kernels, model/quack_gemm.py)
    instead of writing da and reading it back twice (`swiglu_stats`, `swiglu_cast`): CUDA sm_90 (Hopper, where its
    tile was chosen and measured; quack_gemm.py) where quack's epilogue loads (activations are bf16: --fp8 needs
    --bf16; quack declines others and the op's reference serves). Asked once, when the functions are built, before
    the parameters take the model dtype (importing quack is no work for a traced backward); tests patch it to run
    the op's reference on CPU."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and quack_gemm.dswiglu_available())


def epilogue_takes(biased: bool, fast_dgrad: bool) -> bool:
    """Whether a SwiGLU MLP's backward runs through the dgrad epilogue where it loads: not with biases (no column
    sums in that epilogue) nor with fast accumulation in the input-gradient GEMM (quack's FP8 GEMMs promote
    periodically, as torchao's recipe asks of input gradients)."""
    return not biased and not fast_dgrad


def scaled_mm(a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor, out_dtype: torch.dtype,
              fast_accum: bool, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b of FP8 operands (a row-major, b column-major) with their inverse scales, in out_dtype."""
    return torch._scaled_mm(a, b, scale_a=inv_a, scale_b=inv_b, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def _fc2_backward(dy: torch.Tensor, w2_8t: torch.Tensor, inv_w2: torch.Tensor, a8_t: torch.Tensor,
                  inv_a: torch.Tensor, w2_dtype: torch.dtype, fast: tuple[bool, bool, bool]) -> tuple:
    """fc2's (input gradient, weight gradient) from dy, cast to E5M2 as torchao does; both MLP kinds share it."""
    dy8, dy8_t, inv_dy = cast(dy.contiguous(), E5M2)   # row-major, as _scaled_mm's first operand must be
    return (scaled_mm(dy8, w2_8t.t(), inv_dy, inv_w2, dy.dtype, fast[1]),    # [T, H] @ [H, F]
            scaled_mm(dy8_t, a8_t.t(), inv_dy, inv_a, w2_dtype, fast[2]))    # [H, T] @ [T, F]


class _GeluMLP(torch.autograd.Function):
    """y = GeLU(x W1^T + b1) W2^T on [tokens, features] tensors, every GEMM in FP8."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                tanh: bool, fast: tuple[bool, bool, bool]) -> torch.Tensor:
        dt = x.dtype
        x8, x8_t, inv_x = cast(x, E4M3)
        w1_8, w1_8t, inv_w1 = cast_weight(w1)
        w2_8, w2_8t, inv_w2 = cast_weight(w2)
        h = scaled_mm(x8, w1_8.t(), inv_x, inv_w1, dt, fast[0], None if b1 is None else b1.to(dt))
        amax, _ = gelu_stats(h, None, tanh)
        scale_a = to_scale(amax, E4M3)
        a8, a8_t = gelu_cast(h, None, scale_a, tanh, E4M3)
        inv_a = scale_a.reciprocal()
        y = scaled_mm(a8, w2_8.t(), inv_a, inv_w2, dt, fast[0])
        ctx.save_for_backward(x8_t, inv_x, w1_8t, inv_w1, h, a8_t, inv_a, w2_8t, inv_w2)
        ctx.tanh, ctx.fast = tanh, fast
        ctx.dtypes = [t.dtype if t is not None else None for t in (w1, b1, w2)]
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x8_t, inv_x, w1_8t, inv_w1, h, a8_t, inv_a, w2_8t, inv_w2 = ctx.saved_tensors
        dt, (_, fast_dgrad, fast_wgrad) = dy.dtype, ctx.fast
        t_w1, t_b1, t_w2 = ctx.dtypes
        da, dw2 = _fc2_backward(dy, w2_8t, inv_w2, a8_t, inv_a, t_w2, ctx.fast)
        amax, db1 = gelu_stats(h, da, ctx.tanh)
        scale_g = to_scale(amax, E5M2)
        g8, g8_t = gelu_cast(h, da, scale_g, ctx.tanh, E5M2)
        inv_g = scale_g.reciprocal()
        dx = scaled_mm(g8, w1_8t.t(), inv_g, inv_w1, dt, fast_dgrad)                # [T, F] @ [F, H]
        dw1 = scaled_mm(g8_t, x8_t.t(), inv_g, inv_x, t_w1, fast_wgrad)             # [F, T] @ [T, H]
        return dx, dw1, (None if t_b1 is None else db1.to(t_b1)), dw2, None, None


class _SwiGLUMLP(torch.autograd.Function):
    """y = (SiLU(x Wg^T + bg) * (x W1^T + b1)) W2^T on [tokens, features] tensors, every GEMM in FP8; the two
    output gradients (of the gate and of fc1) each get their own scale, as per-linear tensorwise does."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, wg: torch.Tensor, bg: Optional[torch.Tensor], w1: torch.Tensor,
                b1: Optional[torch.Tensor], w2: torch.Tensor, fast: tuple[bool, bool, bool],
                epilogue: bool = False) -> torch.Tensor:
        dt = x.dtype
        x8, x8_t, inv_x = cast(x, E4M3)
        wg8, wg8_t, inv_wg = cast_weight(wg)
        w1_8, w1_8t, inv_w1 = cast_weight(w1)
        w2_8, w2_8t, inv_w2 = cast_weight(w2)
        g = scaled_mm(x8, wg8.t(), inv_x, inv_wg, dt, fast[0], None if bg is None else bg.to(dt))
        u = scaled_mm(x8, w1_8.t(), inv_x, inv_w1, dt, fast[0], None if b1 is None else b1.to(dt))
        amax, _ = swiglu_stats(g, u, None, False)
        scale_a = to_scale(amax, E4M3)
        a8, a8_t = swiglu_cast(g, u, None, scale_a, E4M3)
        inv_a = scale_a[0].reciprocal()
        y = scaled_mm(a8, w2_8.t(), inv_a, inv_w2, dt, fast[0])
        ctx.save_for_backward(x8_t, inv_x, wg8_t, inv_wg, w1_8t, inv_w1, g, u, a8_t, inv_a, w2_8t, inv_w2)
        ctx.fast, ctx.epilogue = fast, epilogue
        ctx.dtypes = [t.dtype if t is not None else None for t in (wg, bg, w1, b1, w2)]
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x8_t, inv_x, wg8_t, inv_wg, w1_8t, inv_w1, g, u, a8_t, inv_a, w2_8t, inv_w2 = ctx.saved_tensors
        dt, (_, fast_dgrad, fast_wgrad) = dy.dtype, ctx.fast
        t_wg, t_bg, t_w1, t_b1, t_w2 = ctx.dtypes
        biased = t_bg is not None or t_b1 is not None
        if ctx.epilogue and epilogue_takes(biased, fast_dgrad):   # da never written
            dy8, dy8_t, inv_dy = cast(dy.contiguous(), E5M2)
            dw2 = scaled_mm(dy8_t, a8_t.t(), inv_dy, inv_a, t_w2, fast_wgrad)
            du, dg, amax = swiglu_dgrad(dy8, w2_8t, inv_dy, inv_w2, g, u)
            scale_g = to_scale(amax, E5M2)   # [d u, d g]
            du8, du8_t, dg8, dg8_t = cast_pair(du, dg, scale_g, E5M2)
            sums = None
        else:
            da, dw2 = _fc2_backward(dy, w2_8t, inv_w2, a8_t, inv_a, t_w2, ctx.fast)
            amax, sums = swiglu_stats(g, u, da, biased)
            scale_g = to_scale(amax, E5M2)   # [d u, d g]
            du8, du8_t, dg8, dg8_t = swiglu_cast(g, u, da, scale_g, E5M2)
        # each inverse scale a tensor of its own: Inductor's _scaled_mm lowering rejects a view into [2]
        inv_du, inv_dg = scale_g[0].reciprocal(), scale_g[1].reciprocal()
        dx = (scaled_mm(dg8, wg8_t.t(), inv_dg, inv_wg, dt, fast_dgrad)       # [T, F] @ [F, H], twice
              + scaled_mm(du8, w1_8t.t(), inv_du, inv_w1, dt, fast_dgrad))
        dwg = scaled_mm(dg8_t, x8_t.t(), inv_dg, inv_x, t_wg, fast_wgrad)      # [F, T] @ [T, H]
        dw1 = scaled_mm(du8_t, x8_t.t(), inv_du, inv_x, t_w1, fast_wgrad)
        dbg = None if t_bg is None else sums[1].to(t_bg)
        db1 = None if t_b1 is None else sums[0].to(t_b1)
        return dx, dwg, dbg, dw1, db1, dw2, None, None


class Float8MLP:
    """`mlp(x, *weights)` = the MLP's local GEMM work (fc2's bias and TP reduction excluded) as one FP8
    function; weights (w1, b1, w2) for GeLU, (wg, bg, w1, b1, w2) for SwiGLU.

    `fallback(x, *weights)` serves token counts FP8's weight-gradient GEMMs cannot take: the per-linear path."""

    def __init__(self, swiglu: bool, tanh: bool, fast: tuple[bool, bool, bool],
                 fallback: Callable[..., torch.Tensor], epilogue: bool = False):
        """fast: fast (lower-precision) accumulation in the forward, input-gradient, weight-gradient GEMMs;
        epilogue: SwiGLU's backward in the down projection's input-gradient GEMM (`dgrad_epilogue_loads`)."""
        self.swiglu, self.tanh, self.fast, self.fallback = swiglu, tanh, fast, fallback
        self.epilogue = epilogue

    def __call__(self, x: torch.Tensor, *weights: Optional[torch.Tensor]) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if x2.shape[0] % 16:
            return self.fallback(x, *weights)
        if self.swiglu:
            y = _SwiGLUMLP.apply(x2, *weights, self.fast, self.epilogue)
        else:
            y = _GeluMLP.apply(x2, *weights, self.tanh, self.fast)
        return y.reshape(*shape[:-1], y.shape[-1])
