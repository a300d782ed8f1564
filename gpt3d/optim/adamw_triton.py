"""The Triton kernel of gpt3d/optim/adamw.py's flat AdamW step: why it exists is bandwidth.

One program per block of at most BLOCK elements of one piece (adamw.block_table, built once): it reads the
gradient (from the fp32 buffer, or from the piece's own half-precision gradient at an address handed over
each step: direct gradients, optim/buckets.py), master and moments once and writes master, moments and the
half-precision parameter once. The math is `reference_step`'s, operation by operation: float64 where torch's
kernel computes in double (the constants from a float64 tensor, the learning rate as three float32 parts that
sum to it exactly), float32 with IEEE-rounded division and square root elsewhere, and no fused multiply-adds,
so the bits are the reference's (benchmarks/adamw_check.py checks that on the GPU, and times the kernel
against torch's fused AdamW).

Imported only where Triton is installed (CUDA wheels of torch bring it).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK, WARPS = 1024, 4   # chosen on one H100 by benchmarks/adamw_check.py (benchmarks/RESULTS.md)


@triton.jit
def _adamw_kernel(g_ptr, master_ptr, m_ptr, v_ptr, out_ptr, off_ptr, flat_ptr, n_ptr, piece_ptr, decay_ptr,
                  start_ptr, gaddr_ptr, steps_ptr, consts_ptr, scale_ptr, inf_ptr, lr_hi, lr_mid, lr_lo,
                  HAS_SCALE: tl.constexpr, DECOUPLED: tl.constexpr, SEPARATE: tl.constexpr, DIRECT: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    off = tl.load(off_ptr + pid)
    flat = tl.load(flat_ptr + pid)
    piece = tl.load(piece_ptr + pid)
    i = tl.arange(0, BLOCK)
    n = tl.where(tl.load(inf_ptr) == 0, tl.load(n_ptr + pid), 0)   # a skipped step reads and writes nothing
    mask = i < n
    b1 = tl.load(consts_ptr)          # float64, as torch's kernel takes them
    b2 = tl.load(consts_ptr + 1)
    eps = tl.load(consts_ptr + 2)
    wd = tl.load(consts_ptr + 3)
    lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_mid, tl.float64) + tl.cast(lr_lo, tl.float64)   # exact
    t = tl.load(steps_ptr + piece).to(tl.float64) + 1.0
    bc1 = (1.0 - tl.exp(t * tl.log(b1))).to(tl.float32)   # b1^t in float64 (~1e-12 of pow), then float32
    bc2s = tl.sqrt(1.0 - tl.exp(t * tl.log(b2))).to(tl.float32)
    step_size = (lr / bc1.to(tl.float64)).to(tl.float32)

    if DIRECT:   # the piece's own gradient (any float dtype; g_ptr is one of them), at its address
        g_base = tl.load(gaddr_ptr + piece).to(tl.pointer_type(g_ptr.dtype.element_ty))
        g = tl.load(g_base + tl.load(start_ptr + pid) + i, mask=mask, other=0.0).to(tl.float32)   # exact
    else:
        g = tl.load(g_ptr + off + i, mask=mask, other=0.0)
    if HAS_SCALE:
        g = tl.math.div_rn(g, tl.load(scale_ptr))
    if SEPARATE:
        p = tl.load(master_ptr + flat + i, mask=mask, other=0.0)
    else:
        p = tl.load(out_ptr + off + i, mask=mask, other=0.0)
    if tl.load(decay_ptr + pid) != 0:
        p64 = p.to(tl.float64)
        if DECOUPLED:
            p = (p64 - lr * wd * p64).to(tl.float32)
        else:
            g = (g.to(tl.float64) + p64 * wd).to(tl.float32)
    g64 = g.to(tl.float64)
    m = (b1 * tl.load(m_ptr + flat + i, mask=mask, other=0.0).to(tl.float64) + (1.0 - b1) * g64).to(tl.float32)
    v = (b2 * tl.load(v_ptr + flat + i, mask=mask, other=0.0).to(tl.float64)
         + (1.0 - b2) * g64 * g64).to(tl.float32)
    denom = (tl.math.div_rn(tl.sqrt_rn(v), bc2s).to(tl.float64) + eps).to(tl.float32)
    p = p - tl.math.div_rn(step_size * m, denom)
    tl.store(m_ptr + flat + i, m, mask=mask)
    tl.store(v_ptr + flat + i, v, mask=mask)
    if SEPARATE:
        tl.store(master_ptr + flat + i, p, mask=mask)
        tl.store(out_ptr + off + i, p.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + off + i, p, mask=mask)


def step(opt, table: tuple[torch.Tensor, ...], grads, lr: float,
         grad_scale: Optional[torch.Tensor], found_inf: torch.Tensor) -> None:
    """One step of `opt` (a FlatAdamW); `table` from adamw.block_table(pieces, BLOCK), on the optimizer's device;
    `grads` the fp32 gradient buffer, or one flat gradient per piece (contiguous, all of one dtype)."""
    lr_parts = []   # three float32s that sum to lr exactly (Triton passes Python floats as float32)
    rest = lr
    for _ in range(3):
        lr_parts.append(float(torch.tensor(rest, dtype=torch.float32)))
        rest -= lr_parts[-1]
    out = opt.param_data
    off, flat, n, piece, decay, start = table
    direct = isinstance(grads, list)
    # Direct: the gradients' addresses, new every step, through pinned memory so that the copy does not sync.
    # Reading by address is safe because backward and this step share one CUDA stream: a gradient freed after
    # the launch is not reused before the kernel has run (a side stream would need record_stream).
    if direct:
        assert len({g.dtype for g in grads}) == 1 and all(g.is_contiguous() for g in grads)   # GradBuffer's
        addrs = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64).pin_memory()
        gaddr, g0 = addrs.to(out.device, non_blocking=True), grads[0]
    else:
        gaddr, g0 = off, grads
    _adamw_kernel[(off.numel(),)](
        g0, opt.master if opt.separate_master else out, opt.exp_avg, opt.exp_avg_sq, out,
        off, flat, n, piece, decay, start, gaddr, opt.steps, opt.consts,
        grad_scale if grad_scale is not None else found_inf,
        found_inf, *lr_parts, HAS_SCALE=grad_scale is not None, DECOUPLED=opt.decoupled,
        SEPARATE=opt.separate_master, DIRECT=direct, BLOCK=BLOCK, num_warps=WARPS,
        enable_fp_fusion=False)   # each operation rounded on its own, as reference_step's: the same bits
