"""Which float dtype "full precision" is: float32, or float64 where torch's default dtype says so.

Half-precision values are upcast to float32 for losses, norms and RoPE, but a float64 run must never be
cast down, or the layout-equivalence tests could not compare layouts exactly: they run in float64
(`torch.set_default_dtype(torch.float64)`), where reduction order changes results by ~1e-16 instead of
~1e-7 and no CPU's vector width (AVX2, AVX-512, AMX) moves a curve past their bound.
"""
from __future__ import annotations

import torch


def full_dtype() -> torch.dtype:
    """The dtype of fp32 runs' parameters, gradients and master weights: torch's default float dtype."""
    return torch.get_default_dtype()


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in at least float32 (half precision is upcast, float64 is kept)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
