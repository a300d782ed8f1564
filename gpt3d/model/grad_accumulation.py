"""Weight gradients added into the fp32 gradient buffer by their own GEMM (Megatron's gradient-accumulation
fusion).

Why: with a gradient buffer (several micro-batches, or DP > 1: optim/grad_buffer.py) each weight gradient is
made in the parameter's dtype and a hook then copies or adds it into its fp32 slot, 10 bytes a parameter every
micro-batch. Here the weight-gradient GEMM adds its product into the slot itself (`main_grad += dy^T x`; on CUDA
an fp32-output GEMM on the bf16/fp16 operands) and autograd gets an uninitialised gradient of the weight's shape
instead, so the per-parameter hooks still fire (bucket counts, overlapped reductions) but add nothing
(`accumulates_in_backward`). The buffer is then zeroed once a step. On one H100 (benchmarks/RESULTS.md, session
46) the layers' weight gradients took 2.2 ms less a micro-batch at the Llama-1.5B shape (4 x 2048) and 2.7 ms at
1.3B (8 x 2048); whole steps: level to +0.3% at the Llama shape 4 micro-batches of 4, +0.5% at 1.3B 2 of 8.

Which weights: those of the TP linears whose GEMM function takes this path (`fuses_wgrad`: this module's
`linear`, cuBLASLt's, model/bias_grad.py's fused GeLU MLP and QKV), marked by `enable_grad_accumulation_fusion`;
FP8's GEMMs cannot (`_scaled_mm` has no C input), nor can a weight used twice (the tied embedding). A marked
weight accumulates in backward only while it has a `main_grad` (the buffer's view: not with direct gradients,
where autograd's gradient is used as made). `--no-gradient-accumulation-fusion` leaves every weight to the hooks.

Numerics: on CUDA the half-precision product is added in fp32 without first being rounded to bf16/fp16 (one
rounding fewer than the hooks' add); with fp32/fp64 parameters it is `addmm_` in their dtype; elsewhere (a CPU
run in bf16) exactly the hooks' arithmetic.

`main_grad` travels from forward to backward as a tensor (on ctx, or saved by a compiled graph, which checks saved
tensors against in-place changes: a compiled layer with selective recompute does). So each weight's `main_grad`
has a version counter of its own (optim/grad_buffer.py makes it so, not a view sharing the buffer's), and the op
leaves it unchanged: its additions are all that ever change that tensor between a forward and its backward (1F1B
pipelines run other micro-batches' backward in between), and they are not changes a saved value could miss,
since no graph reads `main_grad`. The op is therefore declared as mutating nothing; the placeholder it returns,
which autograd consumes, keeps it in the graph.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.param_meta import param_meta, set_meta

MARK = "fuses_wgrad"   # on a GEMM function (or its class): it can take its weights' `main_grad`


def can_fuse(fn: Any) -> bool:
    """Whether a linear's GEMM function (`set_matmul`'s, `set_fused`'s, `set_fused_qkv`'s) takes its weights'
    `main_grad` (through `weight_grad`)."""
    return bool(getattr(fn, MARK, False))


def fusing(fn):
    """Declares a GEMM function `can_fuse` (a plain function; classes say so with a class attribute)."""
    fn.__dict__[MARK] = True
    return fn


def accumulates_in_backward(p: torch.Tensor) -> bool:
    """Whether backward adds `p`'s gradient into `p.main_grad` itself (and hands autograd a placeholder): the
    rule GEMM functions and the gradient buffer's hooks both read."""
    return param_meta(p).fuses_wgrad and getattr(p, "main_grad", None) is not None


def main_grad_of(w: torch.Tensor) -> Optional[torch.Tensor]:
    """What a GEMM function passes to its autograd function for weight `w` (read in forward, kept on ctx, not
    saved: the views of one buffer share a version counter)."""
    return w.main_grad if accumulates_in_backward(w) else None   # type: ignore[attr-defined]


@torch.library.custom_op("gpt3d::wgrad_accumulate", mutates_args=())
def wgrad_accumulate(main_grad: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """main_grad += dy^T x, for dy [T, out] and x [T, in], main_grad's version counter unchanged (module
    docstring); returns an uninitialised [out, in] tensor in dy's dtype, the placeholder autograd hands the hooks
    (made here, once the GEMM is queued, so a compiled backward cannot allocate it ahead of the layer's other
    buffers)."""
    with torch.autograd._unsafe_preserve_version_counter(main_grad):
        if main_grad.is_cuda and main_grad.dtype == torch.float32 and dy.dtype in (torch.bfloat16, torch.float16):
            torch.addmm(main_grad, dy.t(), x, out_dtype=torch.float32, out=main_grad)
        elif dy.dtype == main_grad.dtype:
            main_grad.addmm_(dy.t(), x)
        else:   # no half -> fp32 GEMM here: the product in dy's dtype, then the hooks' add
            main_grad.add_(dy.t() @ x)
    return dy.new_empty(main_grad.shape)


@wgrad_accumulate.register_fake
def _(main_grad, dy, x):
    return dy.new_empty(main_grad.shape)


def weight_grad(dy: torch.Tensor, x: torch.Tensor, main_grad: Optional[torch.Tensor], mm=None) -> torch.Tensor:
    """dy^T x for 2-D `dy` [T, out] and `x` [T, in] (`mm(a, b)`, default torch's, computes a @ b), or, where
    `main_grad` is given, that product added into it and a placeholder of the weight's shape returned."""
    if main_grad is None:
        return dy.t() @ x if mm is None else mm(dy.t(), x)
    return torch.ops.gpt3d.wgrad_accumulate(main_grad, dy, x)


class _Linear(torch.autograd.Function):
    """F.linear(x, w, b), its weight gradient through `weight_grad`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                main_grad: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.bias, ctx.main_grad = b is not None, main_grad
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dy @ w if ctx.needs_input_grad[0] else None
        dw = weight_grad(dy2, x.reshape(-1, x.shape[-1]), ctx.main_grad) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


@fusing
def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`set_matmul`'s function for a linear with torch's GEMMs."""
    return _Linear.apply(x, w, b, main_grad_of(w))


def enable_grad_accumulation_fusion(model: nn.Module) -> int:
    """Mark the weights of every TP linear of `model` whose GEMM function `can_fuse`, giving the linears still on
    torch's F.linear this module's `linear`; returns how many weights. Last of the model's GEMM switches (FP8,
    the fused functions and cuBLASLt choose first)."""
    from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
    from .attention import SelfAttention
    from .gpt import MLP
    marked = []
    bypassed = set()
    for m in model.modules():
        if isinstance(m, MLP) and m._fused is not None:
            fn, linears = m._fused, m.fused_linears()
        elif isinstance(m, SelfAttention) and m._fused_qkv is not None:
            fn, linears = m._fused_qkv, m.fused_linears()
        else:
            continue
        bypassed.update(id(x) for x in linears)
        if can_fuse(fn):
            marked += [x.weight for x in linears]
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and id(m) not in bypassed:
            if m._matmul is None:
                m.set_matmul(linear)
            if can_fuse(m._matmul):
                marked.append(m.weight)
    for w in marked:
        set_meta(w, fuses_wgrad=True)
    return len(marked)
