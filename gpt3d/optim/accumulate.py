"""A half-precision gradient into its fp32 slot of the gradient buffer: the copy (first micro-batch) or add.

Why not `main_grad.copy_(grad)` / `.add_(grad)`: torch's cross-dtype elementwise kernels are not vectorised,
and the per-parameter hooks moving bf16 gradients into the fp32 buffer took ~5 ms of a 1.3B step's 225 on one
H100, every micro-batch. The kernel copies the 1.3B shape's large gradients 1.48x and adds them 1.22x faster
(benchmarks/RESULTS.md, 2026-12-06, session 30). Large gradients go
through a Triton kernel (gpt3d/optim/accumulate_triton.py) where Triton is installed; small ones, where a
launch costs more than the bytes, and every other case (CPU, fp32/fp64 gradients) keep torch's ops. The
result is the same either way: a bf16 -> fp32 conversion is exact, and the add is one fp32 rounding.
"""
from __future__ import annotations

import torch

from ..triton_kernels import triton_kernels

TRITON_MIN_NUMEL = 1 << 20   # below this a kernel launch from Python costs more than the copy saves


_KERNELS = triton_kernels(".accumulate_triton", __package__)


def accumulate(dst: torch.Tensor, src: torch.Tensor, first: bool) -> None:
    """dst = src (first) or dst += src, dst float32, src any float dtype of the same shape."""
    if (_KERNELS is not None and dst.is_cuda and dst.dtype == torch.float32
            and src.dtype in (torch.bfloat16, torch.float16) and src.numel() >= TRITON_MIN_NUMEL
            and dst.is_contiguous() and src.is_contiguous()):
        _KERNELS.accumulate(dst, src, first)
    elif first:
        dst.copy_(src)
    else:
        dst.add_(src)
