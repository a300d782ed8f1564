"""FP8 weights cast once a step instead of once a micro-batch.

Why: with tensorwise scaling a weight's FP8 copy (data, its transpose, scale) depends on the weight alone, and
the weights do not change between an optimizer step's micro-batches, nor when full recompute replays a forward.
Each forward would otherwise take every weight's amax and cast it again (~2 ms a micro-batch at the Llama
shape on one H100, benchmarks/RESULTS.md session 40), the cost Transformer Engine's FP8 weight caching avoids.
`held_casts` casts the FP8 linears' weights once on entry and the FP8 functions (fp8.Float8Matmul, fp8_mlp,
fp8_qkv, all through `fp8_mlp.cast_weight`) use those copies until it exits: the same bits they would cast
themselves. The copies hang on the parameters as a plain attribute, not a buffer (`model.to(dtype)` and
checkpoints never see them); compiled code reads them as inputs, so each step's new copies do not recompile it.
The train step enters it around its micro-batches, before the optimizer step changes the weights; with one
micro-batch and no full recompute (each weight cast once either way) it does not, and the compiled forward
casts the weights inside its graph as before.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from .fp8 import Float8Matmul
from .fp8_mlp import E4M3, WEIGHT_CAST, cast_with_scale


def holds_casts(num_micro: int, recompute: str | None) -> bool:
    """Whether a step with `num_micro` micro-batches (and `recompute`, --recompute-granularity) casts each FP8
    weight more than once, so `held_casts` saves work: the train step's rule and the planner's."""
    return num_micro > 1 or recompute == "full"


def fp8_weights(modules: Iterator[nn.Module]) -> list[nn.Parameter]:
    """The weights the tensorwise FP8 functions cast: every TP linear's whose GEMM is a tensorwise Float8Matmul
    (the rowwise recipes cast inside torchao, along other axes)."""
    return [m.weight for m in modules if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
            and isinstance(m._matmul, Float8Matmul) and m._matmul._cast_once is not None]


def _cast(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return cast_with_scale(w, E4M3)


@contextlib.contextmanager
def held_casts(weights: list[nn.Parameter], compiled: bool = False) -> Iterator[None]:
    """Within: each of `weights` carries its FP8 cast (`fp8_mlp.cast_with_scale(w, E4M3)`), made on entry;
    `compiled`: the casts run as one compiled function per weight shape (as a compiled model's own casts do)
    instead of eager passes. The weights must not change inside."""
    cast: Callable = torch.compile(_cast) if compiled else _cast
    try:
        with torch.no_grad():
            for w in weights:
                setattr(w, WEIGHT_CAST, cast(w.detach()))
        yield
    finally:
        for w in weights:
            setattr(w, WEIGHT_CAST, None)
