"""Rotary position embeddings (the half-split convention of GPT-NeoX/Llama).

Computed inside attention from the sequence length alone, so nothing extra
crosses pipeline stages and any stage can recompute it. `rotary_percent` < 1
rotates only the first part of each head (GPT-NeoX's partial rotary).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..parallel.precision import upcast


class RotaryEmbedding(nn.Module):
    def __init__(self, rot_dim: int, base: int = 10000, device: Optional[torch.device] = None):
        """inv_freq is computed on the CPU (the bits HF's Llama computes) and kept on `device`, the parameters'
        device: a buffer left on the CPU would make compiled code copy it to the GPU in every layer's forward,
        a copy that waits for the GPU to finish all queued work (16 host synchronisations a step at the Llama
        shape; benchmarks/RESULTS.md, 2026-12-07)."""
        super().__init__()
        self.rot_dim = rot_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self._cache: tuple = (0, None, None)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [s, rot_dim] in fp32, cached per length in eager mode. Compiled code computes them in the
        graph instead (constant work that fuses away): writing the cache there would be a side effect that
        breaks the graph inside an activation checkpoint."""
        if torch.compiler.is_compiling():
            return self._table(seq_len, device)
        if self._cache[0] != seq_len or self._cache[1].device != device:
            self._cache = (seq_len, *self._table(seq_len, device))
        return self._cache[1], self._cache[2]

    def _table(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))   # [s, rot/2]
        emb = torch.cat([freqs, freqs], dim=-1)             # [s, rot]
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, head_dim]; rotates the first cos.shape[-1] dims of each head."""
    rot = cos.shape[-1]
    xr, rest = x[..., :rot], x[..., rot:]
    xr = upcast(xr)
    xr = (xr * cos + _rotate_half(xr) * sin).to(x.dtype)
    return torch.cat([xr, rest], dim=-1) if rest.shape[-1] else xr
