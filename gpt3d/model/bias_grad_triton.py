"""Triton kernels for the bias-gradient fusions (gpt3d/model/bias_grad.py): a pass that writes a gradient also
sums its columns, so no later pass re-reads it for the bias gradient.

The GeLU kernel is fp8_mlp_triton.py's backward tile loop (da * GeLU'(h), rounded as autograd stores it)
without the amax; the QKV kernel reads dq, dk, dv where attention's backward left them through
fp8_qkv_triton.py's `_tile` and writes the fused [T, (heads + 2 kv) * hd] gradient. Each program sums
ROWS rows of its column tile in fp32; a torch sum over the programs finishes the column sums. Imported only
where Triton is installed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_mlp_triton import _value
from .fp8_qkv_triton import _layout, _tile

# rows per program, tile rows, GeLU column tile, warps (the QKV column tile is the largest power of two up to
# 128 dividing the head dim): fp8_mlp_triton.py's stats tiles, not yet tuned for these passes (benchmarks/
# bias_grad_check.py --rows --bt --bf --warps).
TILE = dict(ROWS=256, BT=16, BF=128, num_warps=4)   # ROWS a multiple of BT: else rows are summed twice


@triton.jit
def _gelu_grad_kernel(da_ptr, h_ptr, dh_ptr, sum_ptr, T, F, ROWS: tl.constexpr, BT: tl.constexpr,
                      BF: tl.constexpr, TANH: tl.constexpr):
    pid_t, pid_f = tl.program_id(0), tl.program_id(1)
    cols = pid_f * BF + tl.arange(0, BF)
    cmask = cols < F
    total = tl.zeros((BT, BF), tl.float32)
    for i in range(0, ROWS, BT):
        rows = pid_t * ROWS + i + tl.arange(0, BT)
        mask = (rows[:, None] < T) & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * F + cols[None, :]
        g = _value(h_ptr, da_ptr, offs, mask, True, TANH)   # da * GeLU'(h), rounded as autograd stores it
        tl.store(dh_ptr + offs, g.to(dh_ptr.dtype.element_ty), mask=mask)
        total += g
    tl.store(sum_ptr + pid_t * F + cols, tl.sum(total, axis=0), mask=cmask)


@triton.jit
def _qkv_grad_kernel(q_ptr, k_ptr, v_ptr, q_t, q_h, k_t, k_h, v_t, v_h, out_ptr, sum_ptr, T, N, GROUP,
                     HD: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    pid_t, pid_f = tl.program_id(0), tl.program_id(1)
    cols = pid_f * BF + tl.arange(0, BF)
    total = tl.zeros((BT, BF), tl.float32)
    for r in range(0, ROWS, BT):
        rows = pid_t * ROWS + r + tl.arange(0, BT)
        x = _tile(q_ptr, k_ptr, v_ptr, q_t, q_h, k_t, k_h, v_t, v_h, rows, T, pid_f, GROUP, HD, BF)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], x.to(out_ptr.dtype.element_ty),
                 mask=rows[:, None] < T)
        total += x
    tl.store(sum_ptr + pid_t * N + cols, tl.sum(total, axis=0))


def gelu_grad_sums(da: torch.Tensor, h: torch.Tensor, tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(da * GeLU'(h) in h's dtype, its column sums in fp32), h and da [T, F]."""
    da, h = da.contiguous(), h.contiguous()   # the kernel indexes row * F + col
    T, n = h.shape
    c = TILE
    grid = (triton.cdiv(T, c["ROWS"]), triton.cdiv(n, c["BF"]))
    dh = torch.empty_like(h)
    part = torch.empty((grid[0], n), device=h.device, dtype=torch.float32)
    _gelu_grad_kernel[grid](da, h, dh, part, T, n, ROWS=c["ROWS"], BT=c["BT"], BF=c["BF"], TANH=tanh,
                            num_warps=c["num_warps"])
    return dh, part.sum(0)


def qkv_grad_sums(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the fused gradient [T, N] in dq's dtype, its column sums in fp32)."""
    src, strides, T, N, group, hd, bf = _layout(dq, dk, dv)
    c = TILE
    grid = (triton.cdiv(T, c["ROWS"]), N // bf)
    out = torch.empty((T, N), device=dq.device, dtype=dq.dtype)
    part = torch.empty((grid[0], N), device=dq.device, dtype=torch.float32)
    _qkv_grad_kernel[grid](*src, *strides, out, part, T, N, group, HD=hd, ROWS=c["ROWS"], BT=c["BT"], BF=bf,
                           num_warps=c["num_warps"])
    return out, part.sum(0)
