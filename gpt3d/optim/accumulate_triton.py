"""The Triton kernel of gpt3d/optim/accumulate.py: a bf16/fp16 gradient copied or added into fp32, in
vectorised blocks (what torch's cross-dtype elementwise kernels do not do). Checked bit for bit against torch's
copy_/add_, and timed, by benchmarks/accumulate_check.py on the GPU.

Imported only where Triton is installed (CUDA wheels of torch bring it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, WARPS = 4096, 8   # one H100, benchmarks/accumulate_check.py --sweep: five choices within 2% of each other


@triton.jit
def _accumulate_kernel(dst_ptr, src_ptr, n, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src_ptr + offs, mask=mask).to(tl.float32)
    if not FIRST:
        x = tl.load(dst_ptr + offs, mask=mask) + x
    tl.store(dst_ptr + offs, x, mask=mask)


def accumulate(dst: torch.Tensor, src: torch.Tensor, first: bool) -> None:
    n = src.numel()
    _accumulate_kernel[(triton.cdiv(n, BLOCK),)](dst, src, n, FIRST=first, BLOCK=BLOCK, num_warps=WARPS)
