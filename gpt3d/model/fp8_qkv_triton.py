"""Triton kernels for the FP8 QKV function (gpt3d/model/fp8_qkv.py): the output gradient's E5M2 cast, read
straight from the query, key and value gradients where attention's backward left them.

Why: autograd would first assemble the three gradients into the fused QKV layout, and Inductor then reads
them three times (the bias gradient's sums, the amax, the cast into both layouts) through a strided gather,
at 1.4-2 TB/s: ~420 us a layer at 1.3B, ~10 ms a step (benchmarks/RESULTS.md, 2026-12-06). Here a stats pass
(amax and column sums) and a cast pass (row-major and transposed) each read the gradients once. A column
tile of the fused layout [kv groups x (group query heads, key, value) x head dim] lies inside one head of one
of the three gradients, so each program picks its source once and reads plain rows. The math is the
reference's in fp8_qkv.py (and so torchao's tensorwise cast of the assembled gradient): scale in fp32, clamp
to the FP8 range, round to nearest even; NaN propagates. Imported only where Triton is installed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_mlp_triton import _max

# (rows per stats program, tile rows, warps) and (tile rows, warps) for the casts; the column tile is the
# largest power of two up to 128 dividing the head dim. Chosen on one H100 by benchmarks/fp8_qkv_check.py.
STATS = dict(ROWS=256, BT=16, num_warps=4)
CAST = dict(BT=32, num_warps=4)


@triton.jit
def _tile(q_ptr, k_ptr, v_ptr, q_t, q_h, k_t, k_h, v_t, v_h, rows, T, pid_f, GROUP, HD: tl.constexpr,
          BF: tl.constexpr):
    """The [rows, BF] tile of column tile `pid_f` of the fused gradient, in fp32 (rows past T read 0)."""
    col0 = pid_f * BF
    blk, within = col0 // HD, col0 % HD
    g, i = blk // (GROUP + 2), blk % (GROUP + 2)
    g64 = g.to(tl.int64)   # a head's offset reaches the source's size (heads-major: T * hd per head)
    if i < GROUP:
        base, st = q_ptr + (g64 * GROUP + i) * q_h + within, q_t
    elif i == GROUP:
        base, st = k_ptr + g64 * k_h + within, k_t
    else:
        base, st = v_ptr + g64 * v_h + within, v_t
    offs = rows[:, None].to(tl.int64) * st + tl.arange(0, BF)[None, :]
    return tl.load(base + offs, mask=rows[:, None] < T, other=0.0).to(tl.float32)


@triton.jit
def _stats_kernel(q_ptr, k_ptr, v_ptr, q_t, q_h, k_t, k_h, v_t, v_h, amax_ptr, sum_ptr, T, N, GROUP,
                  HD: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, SUMS: tl.constexpr):
    pid_t, pid_f = tl.program_id(0), tl.program_id(1)
    top = tl.zeros((BT, BF), tl.float32)     # reduced across threads once, at the end
    total = tl.zeros((BT, BF), tl.float32)
    for r in range(0, ROWS, BT):
        rows = pid_t * ROWS + r + tl.arange(0, BT)
        x = _tile(q_ptr, k_ptr, v_ptr, q_t, q_h, k_t, k_h, v_t, v_h, rows, T, pid_f, GROUP, HD, BF)
        top = _max(top, tl.abs(x))
        if SUMS:
            total += x
    tl.store(amax_ptr + pid_t * tl.num_programs(1) + pid_f, tl.reduce(tl.reduce(top, 1, _max), 0, _max))
    if SUMS:
        tl.store(sum_ptr + pid_t * N + pid_f * BF + tl.arange(0, BF), tl.sum(total, axis=0))


@triton.jit
def _cast_kernel(q_ptr, k_ptr, v_ptr, q_t, q_h, k_t, k_h, v_t, v_h, scale_ptr, out_ptr, out_t_ptr, T, N, GROUP,
                 HD: tl.constexpr, FP8_MAX: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    pid_f = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = pid_f * BF + tl.arange(0, BF)
    x = _tile(q_ptr, k_ptr, v_ptr, q_t, q_h, k_t, k_h, v_t, v_h, rows, T, pid_f, GROUP, HD, BF)
    q = tl.clamp(x * tl.load(scale_ptr), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    q = q.to(out_ptr.dtype.element_ty)
    mask = rows[:, None] < T
    tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)
    tl.store(out_t_ptr + cols[:, None].to(tl.int64) * T + rows[None, :], tl.trans(q), mask=tl.trans(mask))


def _layout(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple:
    """(sources with unit stride along the head dim, their (token, head) strides, T, N, group, head dim, BF)."""
    src = [t if t.stride(2) == 1 else t.contiguous() for t in (dq, dk, dv)]
    T, heads, hd = dq.shape
    kv = dk.shape[1]
    bf = min(128, hd & -hd)   # the largest power of two dividing hd, at most 128
    strides = [s for t in src for s in (t.stride(0), t.stride(1))]
    return src, strides, T, (heads + 2 * kv) * hd, heads // kv, hd, bf


def stats(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, sums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """amax of the fused gradient, and with `sums` its column sums (fp32; else empty)."""
    src, strides, T, N, group, hd, bf = _layout(dq, dk, dv)
    c = STATS
    grid = (triton.cdiv(T, c["ROWS"]), N // bf)
    part = torch.empty(grid, device=dq.device, dtype=torch.float32)
    total = torch.empty((grid[0], N), device=dq.device, dtype=torch.float32) if sums else part
    _stats_kernel[grid](*src, *strides, part, total, T, N, group, HD=hd, ROWS=c["ROWS"], BT=c["BT"], BF=bf,
                        SUMS=sums, num_warps=c["num_warps"])
    return part.amax(), (total.sum(0) if sums else part.new_empty(0))


def cast(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, scale: torch.Tensor,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused gradient scaled and cast to `dtype`: [T, N] row-major and its transpose [N, T]."""
    src, strides, T, N, group, hd, bf = _layout(dq, dk, dv)
    c = CAST
    out = torch.empty((T, N), device=dq.device, dtype=dtype)
    out_t = torch.empty((N, T), device=dq.device, dtype=dtype)
    grid = (triton.cdiv(T, c["BT"]), N // bf)
    _cast_kernel[grid](*src, *strides, scale, out, out_t, T, N, group, HD=hd, FP8_MAX=torch.finfo(dtype).max,
                       BT=c["BT"], BF=bf, num_warps=c["num_warps"])
    return out, out_t
