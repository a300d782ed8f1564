"""Where gpt3d's Triton kernel modules load: one rule for every op that has them.

Why: each op with Triton kernels (the TP=1 loss, the FP8 and bias-gradient passes, AdamW, the gradient hooks'
copy) keeps a torch reference that serves every device. Its kernels load only where CUDA is available and Triton
is installed (torch's CPU wheels carry no Triton); anywhere else importing gpt3d must not fail.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch


def triton_kernels(name: str, package: str) -> Optional[ModuleType]:
    """The kernel module `name` (relative to `package`, e.g. ".adamw_triton", __package__), or None where CUDA or
    Triton is missing."""
    if not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module(name, package)
    except ImportError:   # no Triton (CPU wheels): the reference serves every device
        return None
