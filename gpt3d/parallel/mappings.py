"""Tensor-parallel communication as autograd functions.

Each op's backward is the conjugate collective of its forward (copy <-> reduce,
all-gather <-> reduce-scatter), which is what makes Megatron's column/row split
exact. The classes are private; layers call the functions, which
are the identity when TP is 1 so a TP layer is exactly nn.Linear there.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .state import ParallelState


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, ps: ParallelState) -> torch.Tensor:
    return x.chunk(ps.tp, dim=dim)[ps.tp_rank].contiguous()


def _gather(x: torch.Tensor, dim: int, ps: ParallelState) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ps.tp)]
    dist.all_gather(parts, x, group=ps.tp_group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, ps: ParallelState) -> torch.Tensor:
    if x.device.type == "cpu":  # gloo has no reduce_scatter: all-reduce, keep our chunk
        summed = _all_reduce(x.contiguous().clone(), ps.tp_group)
        return _split(summed, dim, ps)
    parts = [p.contiguous() for p in x.chunk(ps.tp, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=ps.tp_group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.contiguous(), ctx.ps.tp_group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        return _all_reduce(x.contiguous(), ps.tp_group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather the sequence shards; backward reduce-scatters (the inputs fed TP-split matmuls)."""

    @staticmethod
    def forward(ctx, x, dim, ps):
        ctx.dim, ctx.ps = dim, ps
        return _gather(x, dim, ps)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.ps), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, ps):
        ctx.dim, ctx.ps = dim, ps
        return _reduce_scatter(x, dim, ps)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.ps), None, None


def copy_to_tp(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Identity forward, all-reduce backward: entering a column-parallel region."""
    return x if ps.tp == 1 else _CopyToTP.apply(x, ps)


def reduce_from_tp(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """All-reduce forward, identity backward: leaving a row-parallel region."""
    return x if ps.tp == 1 else _ReduceFromTP.apply(x, ps)


def gather_from_sequence(x: torch.Tensor, ps: ParallelState, dim: int = 1) -> torch.Tensor:
    """Sequence-parallel [b, s/tp, h] -> [b, s, h]; backward reduce-scatters."""
    return x if ps.tp == 1 else _GatherFromSequence.apply(x, dim, ps)


def reduce_scatter_to_sequence(x: torch.Tensor, ps: ParallelState, dim: int = 1) -> torch.Tensor:
    """Partial sums [b, s, h] -> summed shard [b, s/tp, h]; backward all-gathers."""
    return x if ps.tp == 1 else _ReduceScatterToSequence.apply(x, dim, ps)
