"""Megatron's tensor-parallel layers, equal to nn.Linear / nn.Embedding at TP=1.

Every parameter records how it is split and how it is initialised (its
`ParamMeta`, parallel/param_meta.py). Weights are then initialised from the *full* tensor,
generated from (seed, global parameter name), and sliced: any TP/PP layout
gives the same model as one process, and checkpoints know how to reshard.

The GEMM of the two TP linears can be swapped (`set_matmul`, e.g. FP8 GEMMs from
gpt3d/model/fp8.py) without touching their parameters: names, dtypes and
checkpoints stay the same whichever GEMM runs.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .param_meta import param_meta, set_meta
from .mappings import copy_to_tp, gather_from_sequence, reduce_from_tp, reduce_scatter_to_sequence
from .state import ParallelState


def mark(p: nn.Parameter, split_dim: Optional[int], init: tuple, sequence_parallel: bool = False) -> nn.Parameter:
    """Set the layout metadata that init, grad sync, clipping and checkpoints read (`param_meta`)."""
    return set_meta(p, split_dim=split_dim, init=init, sequence_parallel=sequence_parallel)


def full_shape(p: torch.Tensor, tp: int) -> tuple:
    shape = list(p.shape)
    dim = param_meta(p).split_dim
    if dim is not None:
        shape[dim] *= tp
    return tuple(shape)


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, ps: ParallelState, rows_limit: Optional[dict] = None) -> None:
    """Initialise every parameter from its full tensor so the result is layout-independent.

    rows_limit maps parameter names to a row count past which rows are zero (padded vocab rows,
    whose number depends on TP and which never reach the loss).
    """
    for name, p in model.named_parameters():
        meta = param_meta(p)
        if meta.init is None:   # a parameter the model forgot to mark(): a bug, never silently zeroed
            raise RuntimeError(f"parameter {name} has no declared init (mark it with parallel/layers.mark)")
        kind = meta.init[0]
        if kind == "zeros":
            p.zero_()
            continue
        if kind == "ones":
            p.fill_(1.0)
            continue
        shape = full_shape(p, ps.tp)
        key = meta.tied_to or name  # a tied copy is initialised like its original
        gen = torch.Generator(device=p.device).manual_seed(_name_seed(seed, key))
        limit = (rows_limit or {}).get(key, shape[0])
        full = torch.zeros(shape, dtype=torch.float32, device=p.device)
        full[:limit].normal_(0.0, meta.init[1], generator=gen)
        if meta.split_dim is not None:
            full = full.chunk(ps.tp, dim=meta.split_dim)[ps.tp_rank]
        p.copy_(full)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split along its output rows; each rank computes a slice of y.

    With sequence parallelism the input arrives split along the sequence and is
    all-gathered here (its gradient reduce-scattered).
    """

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, *, bias: bool = True,
                 std: float = 0.02):
        super().__init__()
        assert out_features % ps.tp == 0, f"TP {ps.tp} must divide {out_features}"
        self.ps = ps
        self.weight = mark(nn.Parameter(torch.empty(out_features // ps.tp, in_features, device=ps.device)),
                           0, ("normal", std))
        self.bias = mark(nn.Parameter(torch.empty(out_features // ps.tp, device=ps.device)), 0, ("zeros",)) \
            if bias else None
        self._matmul = None

    def set_matmul(self, matmul) -> None:
        """`matmul(x, weight, bias)` replaces F.linear (same parameters, another GEMM); None restores it. The
        weight's gradient-accumulation mark goes: only model/grad_accumulation.py, asking the new GEMM, sets it."""
        object.__setattr__(self, "_matmul", matmul)   # a plain attribute, never a submodule: names stay the same
        set_meta(self.weight, fuses_wgrad=False)

    def gather_input(self, x: torch.Tensor) -> torch.Tensor:
        """The TP communication before the GEMM (for callers that run the GEMM themselves, e.g. a fused MLP)."""
        return gather_from_sequence(x, self.ps) if self.ps.sp else copy_to_tp(x, self.ps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self._matmul or F.linear)(self.gather_input(x), self.weight, self.bias)   # [*, out/tp]


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split along its input columns; partial sums are reduced.

    The bias is added after the reduction (once, not TP times). With sequence
    parallelism the reduction is a reduce-scatter along the sequence, so the
    bias' gradient is partial per rank and flagged for a TP all-reduce.
    """

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, *, bias: bool = True,
                 std: float = 0.02):
        super().__init__()
        assert in_features % ps.tp == 0, f"TP {ps.tp} must divide {in_features}"
        self.ps = ps
        self.weight = mark(nn.Parameter(torch.empty(out_features, in_features // ps.tp, device=ps.device)),
                           1, ("normal", std))
        self.bias = mark(nn.Parameter(torch.empty(out_features, device=ps.device)), None, ("zeros",),
                         sequence_parallel=ps.sp) if bias else None
        self._matmul = None

    def set_matmul(self, matmul) -> None:
        """As ColumnParallelLinear.set_matmul; the bias is added after the reduction, not by `matmul`."""
        object.__setattr__(self, "_matmul", matmul)
        set_meta(self.weight, fuses_wgrad=False)

    def reduce_output(self, y: torch.Tensor) -> torch.Tensor:
        """What follows the GEMM: the partial sums' reduction, then the bias."""
        y = reduce_scatter_to_sequence(y, self.ps) if self.ps.sp else reduce_from_tp(y, self.ps)
        return y + self.bias if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce_output((self._matmul or F.linear)(x, self.weight, None))


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary; out-of-shard ids contribute zeros, then reduce."""

    def __init__(self, num_embeddings: int, dim: int, ps: ParallelState, *, std: float = 0.02):
        super().__init__()
        assert num_embeddings % ps.tp == 0
        self.ps = ps
        self.per_rank = num_embeddings // ps.tp
        self.start = ps.tp_rank * self.per_rank
        self.weight = mark(nn.Parameter(torch.empty(self.per_rank, dim, device=ps.device)), 0, ("normal", std))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sequence(out, self.ps) if self.ps.sp else reduce_from_tp(out, self.ps)
