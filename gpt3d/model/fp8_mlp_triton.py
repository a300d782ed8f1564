"""Triton kernels for the FP8 MLP functions (gpt3d/model/fp8_mlp.py): why they exist is bandwidth.

Tensorwise FP8 needs a tensor's amax before its cast, so each cast is two passes (the forward's first a
pass over h's range where that settles GeLU's amax: `stats`). Inductor writes the GeLU
MLP's at ~1 TB/s of the H100's ~3 (benchmarks/RESULTS.md, 2026-12-06): its amax of the GeLU output is a split
reduction of its own, and the GeLU (SwiGLU) backward's cast into both layouts (row-major for the input-gradient
GEMM, transposed for the weight-gradient GEMM) is a strided scatter. Here each pass reads its inputs once
in 2-D tiles: the stats pass keeps the tile's max (and, in backward, the bias gradient's column sums)
and writes one partial per tile, so the result does not depend on scheduling; the cast pass writes the
tile in both layouts. The math is the reference in fp8_mlp.py: GeLU or SwiGLU (or their gradients) in fp32
of the model-precision inputs, rounded to the model precision where the unfused model stores a tensor, scaled,
clamped to the FP8 range and rounded to nearest even; NaN and inf propagate as there. Triton's erf/exp (and
fp32 division) may differ from CUDA's in the last bits, which can move a rounding (benchmarks/fp8_mlp_check.py
measures how often). Measured speed (RESULTS.md, 2026-12-06): the GeLU kernels beat Inductor's 1.7-2.2x; the
SwiGLU ones by as much at 16384 x 5632 but not at the Llama shape 8192 x 8192, where Inductor's run at ~1.7 TB/s.

Imported only where Triton is installed (CUDA wheels of torch bring it); the CPU reference is the spec.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
K0: tl.constexpr = tl.constexpr(0.7978845608028654)   # sqrt(2/pi), the tanh approximation's
K1: tl.constexpr = tl.constexpr(0.044715)

# (rows per stats program, tile rows, tile cols, warps) and (tile rows, tile cols, warps) for the casts;
# chosen on one H100 by benchmarks/fp8_mlp_check.py (RESULTS.md)
STATS = dict(ROWS=256, BT=16, BF=128, num_warps=4)
CAST = dict(BT=32, BF=128, num_warps=4)


@triton.jit
def _max(a, b):
    """max that keeps a NaN (the torch reference's amax is NaN then, and so is every cast)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tanh_parts(u):
    """((1 + tanh u) / 2, 1 - tanh(u)^2), each within a few ulp of its own size, from e = exp(-2|u|) <= 1. The
    plain t = 2 / (1 + exp(-2u)) - 1 leaves 1 + t and 1 - t*t to cancellation: with the GPU's approximate exp and
    division GeLU' was off by up to ~1e-5 near |h| ~ 5 (t's last bit times GeLU''s x^3 factor; RESULTS.md,
    2026-12-07)."""
    e = tl.exp(-2.0 * tl.abs(u))
    s = 1.0 / (1.0 + e)
    return tl.where(u >= 0, s, e * s), 4.0 * e * s * s


@triton.jit
def _gelu(x, TANH: tl.constexpr):
    if TANH:
        half, _ = _tanh_parts(K0 * (x + K1 * x * x * x))
        return x * half
    else:
        return 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))


@triton.jit
def _gelu_grad(x, TANH: tl.constexpr):
    if TANH:
        half, sech2 = _tanh_parts(K0 * (x + K1 * x * x * x))
        return half + 0.5 * x * sech2 * K0 * (1.0 + 3.0 * K1 * x * x)
    else:
        return 0.5 * (1.0 + tl.math.erf(x * SQRT1_2)) + x * INV_SQRT_2PI * tl.exp(-0.5 * x * x)


@triton.jit
def _value(h_ptr, da_ptr, offs, mask, BACKWARD: tl.constexpr, TANH: tl.constexpr):
    """GeLU(h), or da * GeLU'(h), in fp32, rounded to the model precision as the unfused model stores it."""
    x = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        g = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32) * _gelu_grad(x, TANH)
    else:
        g = _gelu(x, TANH)
    return g.to(h_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _stats_kernel(h_ptr, da_ptr, amax_ptr, sum_ptr, T, F, ROWS: tl.constexpr, BT: tl.constexpr,
                  BF: tl.constexpr, BACKWARD: tl.constexpr, TANH: tl.constexpr):
    pid_t, pid_f = tl.program_id(0), tl.program_id(1)
    cols = pid_f * BF + tl.arange(0, BF)
    cmask = cols < F
    top = tl.zeros((BT, BF), tl.float32)     # reduced across threads once, at the end
    total = tl.zeros((BT, BF), tl.float32)
    for i in range(0, ROWS, BT):
        rows = pid_t * ROWS + i + tl.arange(0, BT)
        mask = (rows[:, None] < T) & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * F + cols[None, :]
        g = _value(h_ptr, da_ptr, offs, mask, BACKWARD, TANH)   # masked entries are GeLU(0) = 0 / 0 * ...
        top = _max(top, tl.abs(g))
        if BACKWARD:
            total += g
    tl.store(amax_ptr + pid_t * tl.num_programs(1) + pid_f, tl.reduce(tl.reduce(top, 1, _max), 0, _max))
    if BACKWARD:
        tl.store(sum_ptr + pid_t * F + cols, tl.sum(total, axis=0), mask=cmask)


@triton.jit
def _cast_kernel(h_ptr, da_ptr, scale_ptr, out_ptr, out_t_ptr, T, F, FP8_MAX: tl.constexpr, BT: tl.constexpr,
                 BF: tl.constexpr, BACKWARD: tl.constexpr, TANH: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    mask = (rows[:, None] < T) & (cols[None, :] < F)
    g = _value(h_ptr, da_ptr, rows[:, None].to(tl.int64) * F + cols[None, :], mask, BACKWARD, TANH)
    q = tl.clamp(g * tl.load(scale_ptr), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    q = q.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * F + cols[None, :], q, mask=mask)
    tl.store(out_t_ptr + cols[:, None].to(tl.int64) * T + rows[None, :], tl.trans(q), mask=tl.trans(mask))


@triton.jit
def _range_kernel(h_ptr, part_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Per program: the max and the min of its ITERS * BLOCK elements of h (NaN kept)."""
    pid = tl.program_id(0)
    hi = tl.full((BLOCK,), float("-inf"), tl.float32)
    lo = tl.full((BLOCK,), float("inf"), tl.float32)
    for i in range(ITERS):
        offs = (pid * ITERS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(h_ptr + offs, mask=offs < n, other=float("nan")).to(tl.float32)
        hi = _max(hi, tl.where(offs < n, x, float("-inf")))
        lo = tl.minimum(lo, tl.where(offs < n, x, float("inf")), propagate_nan=tl.PropagateNan.ALL)
    tl.store(part_ptr + 2 * pid, tl.reduce(hi, 0, _max))
    tl.store(part_ptr + 2 * pid + 1, tl.min(lo, 0))


@triton.jit
def _gate_kernel(h_ptr, part_ptr, n_part, flag_ptr, BLOCK: tl.constexpr, LOOPS: tl.constexpr, TANH: tl.constexpr):
    """One program: the candidate amax GeLU(max h), and whether it is certainly the amax (flag 0) or the full
    pass must run (1). Why the candidate is exact: for x > 0 GeLU's slope is >= 1/2, so GeLU of two neighbouring
    bf16/fp16 values differ by far more than fp32's error and their rounded GeLUs are ordered like them; for
    x < 0, |GeLU(x)| < 0.1701 everywhere. So when the rounded GeLU(max h) >= 0.25 it is the amax; otherwise
    (and where h holds -inf, whose GeLU is NaN, or NaN) the full pass decides."""
    i = tl.arange(0, BLOCK)
    hi = tl.full((BLOCK,), float("-inf"), tl.float32)
    lo = tl.full((BLOCK,), float("inf"), tl.float32)
    for k in range(0, LOOPS):   # LOOPS * BLOCK >= n_part
        start = k * BLOCK
        m = start + i < n_part
        hi = _max(hi, tl.load(part_ptr + 2 * (start + i), mask=m, other=float("-inf")))
        lo = tl.minimum(lo, tl.load(part_ptr + 2 * (start + i) + 1, mask=m, other=float("inf")),
                        propagate_nan=tl.PropagateNan.ALL)
    top = tl.reduce(hi, 0, _max)
    cand = _gelu(top, TANH).to(h_ptr.dtype.element_ty).to(tl.float32)
    sure = (cand >= 0.25) & (tl.min(lo, 0) > float("-inf"))   # False for NaN
    tl.store(flag_ptr, tl.where(sure, 0, 1))
    tl.store(flag_ptr + 1, cand.to(tl.int32, bitcast=True))


@triton.jit
def _gated_stats_kernel(h_ptr, flag_ptr, amax_ptr, T, F, ROWS: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
                        TANH: tl.constexpr):
    """_stats_kernel's forward where _gate_kernel found it needed; else each program writes the candidate."""
    at = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    if tl.load(flag_ptr) == 0:
        tl.store(amax_ptr + at, tl.load(flag_ptr + 1).to(tl.float32, bitcast=True))
    else:
        _stats_kernel(h_ptr, h_ptr, amax_ptr, amax_ptr, T, F, ROWS, BT, BF, False, TANH)


RANGE = dict(BLOCK=4096, ITERS=8, num_warps=8)


def stats(h: torch.Tensor, da: torch.Tensor | None, tanh: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """amax of GeLU(h) (da None) or of da * GeLU'(h), and then also that product's column sums (fp32).

    Forward with bf16/fp16 h: a pass over h's range instead of GeLU's (GeLU is monotonic where it matters;
    _gate_kernel says why and when), then the GeLU pass only where that does not settle the amax, decided on the
    GPU: no host sync, the same bits."""
    T, F = h.shape
    c = STATS
    grid = (triton.cdiv(T, c["ROWS"]), triton.cdiv(F, c["BF"]))
    part = torch.empty(grid, device=h.device, dtype=torch.float32)
    if da is None and h.dtype in (torch.bfloat16, torch.float16):
        r = RANGE
        n_prog = triton.cdiv(h.numel(), r["BLOCK"] * r["ITERS"])
        ranges = torch.empty(2 * n_prog, device=h.device, dtype=torch.float32)
        flag = torch.empty(2, device=h.device, dtype=torch.int32)
        _range_kernel[(n_prog,)](h, ranges, h.numel(), BLOCK=r["BLOCK"], ITERS=r["ITERS"], num_warps=r["num_warps"])
        _gate_kernel[(1,)](h, ranges, n_prog, flag, BLOCK=1024, LOOPS=triton.cdiv(n_prog, 1024), TANH=tanh,
                           num_warps=4)
        _gated_stats_kernel[grid](h, flag, part, T, F, ROWS=c["ROWS"], BT=c["BT"], BF=c["BF"], TANH=tanh,
                                  num_warps=c["num_warps"])
        return part.amax(), None
    sums = torch.empty((grid[0], F), device=h.device, dtype=torch.float32) if da is not None else part
    _stats_kernel[grid](h, da if da is not None else h, part, sums, T, F, ROWS=c["ROWS"], BT=c["BT"], BF=c["BF"],
                        BACKWARD=da is not None, TANH=tanh, num_warps=c["num_warps"])
    return part.amax(), (sums.sum(0) if da is not None else None)


def cast(h: torch.Tensor, da: torch.Tensor | None, scale: torch.Tensor, tanh: bool,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """GeLU(h) (da None) or da * GeLU'(h), scaled and cast to `dtype`, row-major and transposed."""
    T, F = h.shape
    c = CAST
    out = torch.empty((T, F), device=h.device, dtype=dtype)
    out_t = torch.empty((F, T), device=h.device, dtype=dtype)
    grid = (triton.cdiv(T, c["BT"]), triton.cdiv(F, c["BF"]))
    _cast_kernel[grid](h, da if da is not None else h, scale, out, out_t, T, F, FP8_MAX=torch.finfo(dtype).max,
                       BT=c["BT"], BF=c["BF"], BACKWARD=da is not None, TANH=tanh, num_warps=c["num_warps"])
    return out, out_t


@triton.jit
def _swiglu_values(g_ptr, u_ptr, da_ptr, offs, mask, BACKWARD: tl.constexpr):
    """SiLU(g) * u; or its gradients (d u, d g) from da. Rounded where the unfused model stores a tensor:
    SiLU(g), the product, and in backward da * SiLU(g), da * u and SiLU's backward."""
    dt = g_ptr.dtype.element_ty
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    if BACKWARD:
        da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        du = (da * s).to(dt).to(tl.float32)
        ds = (da * u).to(dt).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        dg = (ds * sig * (1.0 + g * (1.0 - sig))).to(dt).to(tl.float32)
        return du, dg
    else:
        a = (s * u).to(dt).to(tl.float32)
        return a, a


@triton.jit
def _swiglu_stats_kernel(g_ptr, u_ptr, da_ptr, amax_ptr, sum_ptr, T, F, ROWS: tl.constexpr, BT: tl.constexpr,
                         BF: tl.constexpr, BACKWARD: tl.constexpr, SUMS: tl.constexpr):
    pid_t, pid_f = tl.program_id(0), tl.program_id(1)
    cols = pid_f * BF + tl.arange(0, BF)
    cmask = cols < F
    top0 = tl.zeros((BT, BF), tl.float32)
    top1 = tl.zeros((BT, BF), tl.float32)
    tot0 = tl.zeros((BT, BF), tl.float32)
    tot1 = tl.zeros((BT, BF), tl.float32)
    for i in range(0, ROWS, BT):
        rows = pid_t * ROWS + i + tl.arange(0, BT)
        mask = (rows[:, None] < T) & cmask[None, :]
        v0, v1 = _swiglu_values(g_ptr, u_ptr, da_ptr, rows[:, None].to(tl.int64) * F + cols[None, :], mask,
                                BACKWARD)   # masked entries: SiLU(0) * 0 = 0
        top0 = _max(top0, tl.abs(v0))
        if BACKWARD:
            top1 = _max(top1, tl.abs(v1))
            if SUMS:
                tot0 += v0
                tot1 += v1
    n_f = tl.num_programs(1)
    at = pid_t * n_f + pid_f
    tl.store(amax_ptr + at, tl.reduce(tl.reduce(top0, 1, _max), 0, _max))
    if BACKWARD:
        tl.store(amax_ptr + tl.num_programs(0) * n_f + at, tl.reduce(tl.reduce(top1, 1, _max), 0, _max))
        if SUMS:
            tl.store(sum_ptr + pid_t * F + cols, tl.sum(tot0, axis=0), mask=cmask)
            tl.store(sum_ptr + (tl.num_programs(0) + pid_t) * F + cols, tl.sum(tot1, axis=0), mask=cmask)


@triton.jit
def _store_both(out_ptr, out_t_ptr, v, scale, rows, cols, mask, T, F, FP8_MAX: tl.constexpr):
    q = tl.clamp(v * scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * F + cols[None, :], q, mask=mask)
    tl.store(out_t_ptr + cols[:, None].to(tl.int64) * T + rows[None, :], tl.trans(q), mask=tl.trans(mask))


@triton.jit
def _swiglu_cast_kernel(g_ptr, u_ptr, da_ptr, scale_ptr, o0_ptr, o0_t_ptr, o1_ptr, o1_t_ptr, T, F,
                        FP8_MAX: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BACKWARD: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    mask = (rows[:, None] < T) & (cols[None, :] < F)
    v0, v1 = _swiglu_values(g_ptr, u_ptr, da_ptr, rows[:, None].to(tl.int64) * F + cols[None, :], mask, BACKWARD)
    _store_both(o0_ptr, o0_t_ptr, v0, tl.load(scale_ptr), rows, cols, mask, T, F, FP8_MAX)
    if BACKWARD:
        _store_both(o1_ptr, o1_t_ptr, v1, tl.load(scale_ptr + 1), rows, cols, mask, T, F, FP8_MAX)


def swiglu_stats(g: torch.Tensor, u: torch.Tensor, da: torch.Tensor | None,
                 sums: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """amax of SiLU(g) * u ([1]), or of its gradients (d u, d g) ([2]) and, with `sums`, their column sums
    ([2, F], fp32)."""
    T, F = g.shape
    c = STATS
    grid = (triton.cdiv(T, c["ROWS"]), triton.cdiv(F, c["BF"]))
    k = 1 if da is None else 2
    part = torch.empty((k, *grid), device=g.device, dtype=torch.float32)
    with_sums = da is not None and sums
    total = torch.empty((2, grid[0], F), device=g.device, dtype=torch.float32) if with_sums else part
    _swiglu_stats_kernel[grid](g, u, da if da is not None else g, part, total, T, F, ROWS=c["ROWS"], BT=c["BT"],
                               BF=c["BF"], BACKWARD=da is not None, SUMS=with_sums, num_warps=c["num_warps"])
    return part.flatten(1).amax(1), (total.sum(1) if with_sums else None)


def swiglu_cast(g: torch.Tensor, u: torch.Tensor, da: torch.Tensor | None, scale: torch.Tensor,
                dtype: torch.dtype) -> list[torch.Tensor]:
    """[a, a transposed] (da None) or [d u, its transpose, d g, its transpose], scaled by scale[i], in `dtype`."""
    T, F = g.shape
    c = CAST
    out = [torch.empty(s, device=g.device, dtype=dtype) for s in ((T, F), (F, T)) * (1 if da is None else 2)]
    o1, o1_t = (out[2], out[3]) if da is not None else (out[0], out[1])
    grid = (triton.cdiv(T, c["BT"]), triton.cdiv(F, c["BF"]))
    _swiglu_cast_kernel[grid](g, u, da if da is not None else g, scale, out[0], out[1], o1, o1_t, T, F,
                              FP8_MAX=torch.finfo(dtype).max, BT=c["BT"], BF=c["BF"], BACKWARD=da is not None,
                              num_warps=c["num_warps"])
    return out


@triton.jit
def _pair_cast_kernel(a_ptr, b_ptr, scale_ptr, o0_ptr, o0_t_ptr, o1_ptr, o1_t_ptr, T, F, FP8_MAX: tl.constexpr,
                      BT: tl.constexpr, BF: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    mask = (rows[:, None] < T) & (cols[None, :] < F)
    offs = rows[:, None].to(tl.int64) * F + cols[None, :]
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _store_both(o0_ptr, o0_t_ptr, a, tl.load(scale_ptr), rows, cols, mask, T, F, FP8_MAX)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _store_both(o1_ptr, o1_t_ptr, b, tl.load(scale_ptr + 1), rows, cols, mask, T, F, FP8_MAX)


def cast_pair(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """[a, a transposed, b, b transposed], a scaled by scale[0] and b by scale[1], in `dtype` (a, b [T, F]
    row-major)."""
    T, F = a.shape
    c = CAST
    out = [torch.empty(s, device=a.device, dtype=dtype) for s in ((T, F), (F, T)) * 2]
    grid = (triton.cdiv(T, c["BT"]), triton.cdiv(F, c["BF"]))
    _pair_cast_kernel[grid](a, b, scale, *out, T, F, FP8_MAX=torch.finfo(dtype).max, BT=c["BT"], BF=c["BF"],
                            num_warps=c["num_warps"])
    return out
