"""FP8 weights cast once a step instead of once a micro-batch.

Why: with tensorwise scaling a weight's FP8 copy (data, its transpose, scale) depends on the weight alone, and
the weights do not change between an optimizer step's micro-batches, nor when full recompute replays a forward.
Each forward would otherwise take every weight's amax and cast it again (~2 ms a micro-batch at the Llama
shape on one H100, benchmarks/RESULTS.md session 40), the cost Transformer Engine's FP8 weight caching avoids
(held there: +1.7% tokens/s at 4 micro-batches of 4, session 45).
`held_casts` casts the FP8 linears' weights once on entry and the FP8 functions (fp8.Float8Matmul, fp8_mlp,
fp8_qkv, all through `fp8_mlp.cast_weight`) use those copies until it exits: the same bits they would cast
themselves. Only the weights of the MLP and QKV functions, whose backward reads the weight's transpose, hold a
transposed copy too, and only in training (torchao's per-linear backward transposes the FP8 data itself).
The copies hang on the parameters as a plain attribute, not a buffer (`model.to(dtype)` and checkpoints never
see them), gone again on exit; compiled code reads them as inputs, so each step's new copies do not recompile
it.
The train step enters it around its micro-batches, before the optimizer step changes the weights; with one
micro-batch and no full recompute (each weight cast once either way) it does not, and the compiled forward
casts the weights inside its graph as before.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from .attention import SelfAttention
from .fp8 import Float8Matmul
from .fp8_mlp import E4M3, WEIGHT_CAST, Float8MLP, ScaledCast, cast_with_scale
from .fp8_qkv import Float8QKV
from .gpt import MLP


def holds_casts(num_micro: int, recompute: str | None) -> bool:
    """Whether a step with `num_micro` micro-batches (and `recompute`, --recompute-granularity) casts each FP8
    weight more than once, so `held_casts` saves work: the train step's rule and the planner's."""
    return num_micro > 1 or recompute == "full"


def fp8_weights(modules: Iterable[nn.Module]) -> list[tuple[nn.Parameter, bool]]:
    """(weight, whether its backward reads a transposed copy) for each weight the tensorwise FP8 functions
    cast: every TP linear's whose GEMM is a Float8Matmul that casts once (the rowwise recipes cast inside
    torchao, along other axes); transposed: the linears of the MLP and QKV functions."""
    modules, functions = list(modules), set()
    for m in modules:
        if isinstance(m, MLP) and isinstance(m._fused, Float8MLP):
            functions |= {id(m.fc1), id(m.fc2)} | ({id(m.gate)} if m.swiglu else set())
        elif isinstance(m, SelfAttention) and isinstance(m._fused_qkv, Float8QKV):
            functions.add(id(m.qkv))
    return [(m.weight, id(m) in functions) for m in modules
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
            and isinstance(m._matmul, Float8Matmul) and m._matmul.casts_once]


def _cast(w: torch.Tensor, transposed: bool) -> ScaledCast:
    return cast_with_scale(w, E4M3, transposed)


def weight_caster(compiled: bool) -> Callable[[torch.Tensor, bool], ScaledCast]:
    """`held_casts`'s cast: `compiled`, one compiled function (Inductor's kernels, as a compiled model's own
    casts are) instead of eager passes; made once, for the run."""
    return torch.compile(_cast) if compiled else _cast


@contextlib.contextmanager
def held_casts(weights: list[tuple[nn.Parameter, bool]], cast: Callable = _cast,
               transposes: bool = True) -> Iterator[None]:
    """Within: each of `weights` (from `fp8_weights`) carries its FP8 cast, made on entry by `cast`
    (`weight_caster`): `fp8_mlp.cast_with_scale(w, E4M3)`, with the transposed copy where `fp8_weights` says
    and `transposes` (False: forward only). The weights must not change inside."""
    try:
        with torch.no_grad():
            for w, transposed in weights:
                setattr(w, WEIGHT_CAST, cast(w.detach(), transposed and transposes))
        yield
    finally:   # gone, not None: compiled code guards on the attribute, and steps without held casts had none
        for w, _ in weights:
            if hasattr(w, WEIGHT_CAST):
                delattr(w, WEIGHT_CAST)
