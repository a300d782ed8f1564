"""Triton kernels for the TP=1 loss on GPU (gpt3d/parallel/cross_entropy.py `dense_ce_*`): why they exist is bandwidth.

The loss reads [tokens, vocabulary] bf16 logits -- 3.3 GB a step at 125M (16 x 2048 tokens, 50,304 columns) --
once in forward and once more in backward, where it also writes their gradient. Inductor's kernels for
F.cross_entropy ran its forward at ~1.1 TB/s and its backward at ~1.65 TB/s of the H100's ~3 (benchmarks/RESULTS.md,
2026-12-06 session 34: 7.3 ms of a 71 ms 125M step). Here one program walks one row in blocks: forward keeps a
running max and a rescaled running sum (one exp per element) and writes the row's loss and log-sum-exp in fp32;
backward writes (exp(x - lse) - onehot(target)) * grad in the logits' dtype over the logits, padded columns 0
(the logits are dead after it, so their gradient needs no second [tokens, vocab] buffer). The math is the
reference in cross_entropy.py; exp/log may differ from CUDA's in the last bits. A target outside the real
vocabulary gives a NaN loss (nothing is read out of the row), as no valid token can.

Imported only where Triton is installed (CUDA wheels of torch bring it); the CPU reference is the spec.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, WARPS = 4096, 8   # columns per step of a row's loop; chosen on one H100 by benchmarks/cross_entropy_probe.py


@triton.jit
def _forward(x_ptr, t_ptr, loss_ptr, lse_ptr, stride, v_real, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    m = -float("inf")
    s = 0.0
    for start in range(0, v_real, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < v_real, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(t_ptr + row)
    inside = (target >= 0) & (target < v_real)
    picked = tl.load(base + tl.where(inside, target, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(inside, lse - picked, float("nan")))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _backward(x_ptr, t_ptr, lse_ptr, g_ptr, stride, v_real, v_pad, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    target = tl.load(t_ptr + row)
    for start in range(0, v_pad, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < v_real, other=-float("inf")).to(tl.float32)
        p = tl.exp(x - lse)
        d = (p - tl.where(cols == target, 1.0, 0.0)) * g
        d = tl.where(cols < v_real, d, 0.0)
        tl.store(base + cols, d.to(x_ptr.dtype.element_ty), mask=cols < v_pad)


def forward(logits: torch.Tensor, target: torch.Tensor, v_real: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, log-sum-exp), fp32 [N], of logits [N, V_pad] (unit column stride) whose first v_real columns are real."""
    n = logits.shape[0]
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    if n:
        _forward[(n,)](logits, target, loss, lse, logits.stride(0), v_real, BLOCK=BLOCK, num_warps=WARPS)
    return loss, lse


def backward_(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, v_real: int) -> None:
    """Overwrites logits [N, V_pad] (unit column stride) with d(sum grad * loss)/d logits; padded columns 0.
    Each program reads a block of its row before writing it, so the pass is safe in place."""
    n, v_pad = logits.shape
    if n:
        _backward[(n,)](logits, target, lse, grad, logits.stride(0), v_real, v_pad, BLOCK=BLOCK, num_warps=WARPS)
