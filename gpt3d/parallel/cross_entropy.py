"""Cross entropy over vocabulary-split logits, never gathering the full logits.

Each TP rank holds logits for a slice of the vocabulary: the max, the target
logit and the sum of exponentials are reduced across TP (small all-reduces of
[tokens] tensors) instead of all-gathering [tokens, vocab]. Padded vocabulary
columns (their count depends on TP) are masked out, so the loss is identical
for every TP size.

`linear_cross_entropy` goes one step further and fuses the output projection:
it walks the tokens in chunks, and for each chunk computes the logits, the loss
and at once the logits' gradient, turns that into the input and weight
gradients, and drops the chunk. The full [tokens x vocab] logits (2 GiB per
8k tokens at a 128k vocabulary, twice with their gradient) never exist.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..triton_kernels import triton_kernels
from .precision import upcast
from .state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, ps):
        # logits: [N, V_local] (any float dtype); target: [N] global token ids
        x = upcast(logits)
        per_rank = x.shape[-1]
        start = ps.tp_rank * per_rank
        real_here = max(0, min(per_rank, vocab_size - start))
        if real_here < per_rank:
            x = x.clone() if logits.dtype == torch.float32 else x   # .float() returned the logits themselves
            x[:, real_here:] = float("-inf")
        m = x.max(dim=-1).values
        if ps.tp > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.tp_group)
        x = x - m.unsqueeze(-1)
        local_t = target - start
        inside = (local_t >= 0) & (local_t < per_rank)
        local_t = local_t.masked_fill(~inside, 0)
        picked = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
        x.exp_()
        sum_exp = x.sum(dim=-1)
        if ps.tp > 1:
            both = torch.stack([picked, sum_exp])
            dist.all_reduce(both, group=ps.tp_group)
            picked, sum_exp = both[0], both[1]
        loss = sum_exp.log() - picked
        x.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(x, local_t, inside)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, inside = ctx.saved_tensors
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= inside.to(grad.dtype)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None


def _dense_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return F.cross_entropy(upcast(logits[:, :vocab_size]), target, reduction="none")


def _ce_forward_ref(logits, target, vocab_size):
    x = upcast(logits[:, :vocab_size])
    lse = torch.logsumexp(x, dim=-1)
    inside = (target >= 0) & (target < vocab_size)
    picked = x.gather(-1, target.masked_fill(~inside, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(inside, lse - picked, float("nan")), lse


def _ce_backward_ref_(logits, target, lse, grad, vocab_size) -> None:
    x = upcast(logits[:, :vocab_size])
    cols = torch.arange(vocab_size, device=x.device)
    d = (torch.exp(x - lse.unsqueeze(-1)) - (cols == target.unsqueeze(-1)).to(x.dtype)) * grad.unsqueeze(-1)
    logits[:, :vocab_size] = d.to(logits.dtype)
    logits[:, vocab_size:] = 0


@torch.library.custom_op("gpt3d::dense_ce_forward", mutates_args=())
def dense_ce_forward(logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, log-sum-exp) in fp32 (float64 for float64 logits) of logits [N, V_pad] whose first
    `vocab_size` columns are real; a target outside them gives NaN. The spec of the Triton kernels."""
    return _ce_forward_ref(logits, target, vocab_size)


@dense_ce_forward.register_fake
def _(logits, target, vocab_size):
    opmath = torch.promote_types(logits.dtype, torch.float32)
    return logits.new_empty(logits.shape[0], dtype=opmath), logits.new_empty(logits.shape[0], dtype=opmath)


@torch.library.custom_op("gpt3d::dense_ce_backward_", mutates_args=("logits",))
def dense_ce_backward_(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                       vocab_size: int) -> None:
    """Overwrites the logits with their gradient (softmax - one_hot(target)) * grad per row, padded columns 0."""
    _ce_backward_ref_(logits, target, lse, grad, vocab_size)


def _dense_ce_setup(ctx, inputs, output):
    logits, target, vocab_size = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.vocab_size = vocab_size


def _dense_ce_grad(ctx, grad_loss, grad_lse):
    """The logits' gradient is written over the saved logits (one [tokens, vocab] buffer, not two: 3 GiB at 125M,
    16 x 2048 tokens). Autograd's version check makes a second backward through the same graph raise."""
    logits, target, lse = ctx.saved_tensors
    dense_ce_backward_(logits, target, lse, upcast(grad_loss).contiguous(), ctx.vocab_size)
    return logits, None, None


torch.library.register_autograd("gpt3d::dense_ce_forward", _dense_ce_grad, setup_context=_dense_ce_setup)


def _register_triton(k) -> bool:
    @dense_ce_forward.register_kernel("cuda")
    def _(logits, target, vocab_size):
        if logits.dtype == torch.float64:   # the kernels compute in fp32
            return _ce_forward_ref(logits, target, vocab_size)
        return k.forward(logits.contiguous(), target.contiguous(), vocab_size)

    @dense_ce_backward_.register_kernel("cuda")
    def _(logits, target, lse, grad, vocab_size):
        if logits.dtype == torch.float64:
            return _ce_backward_ref_(logits, target, lse, grad, vocab_size)
        rows = logits if logits.stride(-1) == 1 else logits.contiguous()   # the kernel walks unit-stride rows
        k.backward_(rows, target.contiguous(), lse.contiguous(), grad.contiguous(), vocab_size)
        if rows is not logits:
            logits.copy_(rows)
    return True


_KERNELS = triton_kernels(".cross_entropy_triton", __package__)
_TRITON = _KERNELS is not None and _register_triton(_KERNELS)
_compiled_dense = None


def _dense_loss(logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    base = logits if logits._base is None else logits._base
    if logits.requires_grad and base.is_leaf:
        logits = logits.clone()
    return dense_ce_forward(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), vocab_size)[0].view(target.shape)


_loss_call = _dense_loss   # torch.compiler.disable(_dense_loss) once gpt3d compiles a model (keep_loss_out_of_graphs)


def keep_loss_out_of_graphs() -> None:
    """Called where gpt3d compiles a model (model/build.py compile_chunks): from then on `dense_loss` runs between
    compiled graphs. Not done at import: torch.compiler.disable imports Dynamo, ~2.4 s for every process."""
    global _loss_call
    if _loss_call is _dense_loss:
        _loss_call = torch.compiler.disable(_dense_loss)


def dense_loss(logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token loss [*] of logits [*, V_pad] through the ops above, kept out of compiled graphs
    (keep_loss_out_of_graphs): there a saved tensor is a graph input of backward, which Inductor will not let an op
    overwrite, so it would copy the whole logits first (one more pass over them: ~2 ms at 125M). Eager autograd
    hands the op the saved logits themselves. The logits are consumed: after backward their storage holds their
    gradient (callers pass the head's output, which nothing else keeps); a caller's leaf, or a view of one, is
    copied instead."""
    return _loss_call(logits, target, vocab_size)


def _fused_dense(logits, target, vocab_size):
    """TP=1 on GPU: the Triton kernels read the bf16 logits once in forward (online log-sum-exp) and once in
    backward, which writes their bf16 gradient over them, with no fp32 copy of [tokens, vocab]. Without
    Triton, one compiled kernel of F.cross_entropy does the same at about half the bandwidth."""
    global _compiled_dense
    if _TRITON and logits.dtype != torch.float64:
        return dense_loss(logits, target, vocab_size)
    if _compiled_dense is None:
        _compiled_dense = torch.compile(_dense_cross_entropy, dynamic=False)
    return _compiled_dense(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), vocab_size).view(target.shape)


def _dense_device(logits: torch.Tensor) -> bool:
    """Where the TP=1 loss takes the dense path above (a seam: CPU tests route the model through it)."""
    return logits.is_cuda


def _chunk_stats(logits: torch.Tensor, local_t: torch.Tensor, inside: torch.Tensor, real: int):
    """Row max, sum of exp(x - max) and target logit over the first `real` (unpadded) columns, in fp32."""
    x = upcast(logits[:, :real])
    m = x.amax(dim=-1)
    s = torch.exp(x - m.unsqueeze(-1)).sum(dim=-1)
    picked = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
    return m, s, picked


def _chunk_grad(logits: torch.Tensor, m: torch.Tensor, s: torch.Tensor, local_t: torch.Tensor,
                inside: torch.Tensor, real: int) -> torch.Tensor:
    """d loss / d logits = softmax - one_hot(target), in the logits' dtype; padded columns get 0."""
    x = upcast(logits)
    cols = torch.arange(x.shape[-1], device=x.device)
    p = torch.exp(x - m.unsqueeze(-1)) / s.unsqueeze(-1)
    p = torch.where(cols < real, p, 0.0)
    hit = (cols == local_t.unsqueeze(-1)) & inside.unsqueeze(-1)
    return (p - hit.to(p.dtype)).to(logits.dtype)


_compiled: dict = {}


def _kernel(fn, on_gpu: bool):
    """One compiled kernel per helper on GPU (reads the bf16 chunk once, no fp32 copies); eager on CPU."""
    if not on_gpu:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def _accumulate_wgrad(gw: Optional[torch.Tensor], g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gw += g^T x with an fp32 accumulator, the product summed in fp32 by the GEMM itself on GPU."""
    if g.dtype == torch.float32 or not g.is_cuda or torch.compiler.is_compiling():
        # fp32 output of a half GEMM is CUDA-only, and its addmm form does not trace (torch 2.11)
        part = upcast(g.t() @ x)
        return part if gw is None else gw + part
    if gw is None:
        return torch.mm(g.t(), x, out_dtype=torch.float32)
    return torch.addmm(gw, g.t(), x, out_dtype=torch.float32)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token loss of softmax(x W^T) against `target`; gradients computed chunk by chunk in forward.

    Contract: the caller reduces the per-token losses with equal weights (mean or sum, as training does).
    The input gradient is scaled per token exactly; the weight gradient was summed over tokens with
    weight 1 and is scaled by the mean incoming gradient."""

    @staticmethod
    def forward(ctx, x, weight, target, vocab_size, ps, chunk, need_grad):
        # x: [N, h] (this rank's full copy); weight: [V/tp, h]; target: [N] global ids
        n, per_rank = x.shape[0], weight.shape[0]
        start = ps.tp_rank * per_rank
        real = max(0, min(per_rank, vocab_size - start))
        local_t = target - start
        inside = (local_t >= 0) & (local_t < real)
        local_t = local_t.masked_fill(~inside, 0)
        on_gpu = x.is_cuda
        stats, grad_fn = _kernel(_chunk_stats, on_gpu), _kernel(_chunk_grad, on_gpu)
        losses, gx, gw = [], [], None
        for i in range(0, n, chunk):
            xc, tc, ic = x[i:i + chunk], local_t[i:i + chunk], inside[i:i + chunk]
            logits = xc @ weight.t()                                   # [c, V/tp]
            if real > 0:
                m, s, picked = stats(logits, tc, ic, real)
            else:   # a rank holding only padded columns
                m = torch.full((xc.shape[0],), float("-inf"), device=x.device)
                s, picked = torch.zeros_like(m), torch.zeros_like(m)
            if ps.tp > 1:
                m_local = m
                m = m_local.clone()
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.tp_group)
                both = torch.stack([s * torch.exp(m_local - m), picked])
                dist.all_reduce(both, group=ps.tp_group)
                s, picked = both[0], both[1]
            losses.append(torch.log(s) + m - picked)
            if need_grad:
                g = grad_fn(logits, m, s, tc, ic, real)               # [c, V/tp], x's dtype
                del logits
                gx.append(g @ weight)                                  # [c, h] (partial over TP)
                gw = _accumulate_wgrad(gw, g, xc)                      # [V/tp, h] fp32
        if need_grad:
            ctx.save_for_backward(torch.cat(gx), gw)
            ctx.weight_dtype = weight.dtype
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_loss):
        gx, gw = ctx.saved_tensors
        grad_x = gx * grad_loss.unsqueeze(-1).to(gx.dtype)
        grad_w = (gw * upcast(grad_loss).mean()).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None, None, None


CHUNK_BYTES = 1 << 29   # logits per chunk: 512 MiB (2k tokens at a 128k vocabulary in bf16)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, vocab_size: int,
                         ps: ParallelState, chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per-token loss [*] of logits x W^T without materialising them: x [*, h] already copied (or gathered)
    to every TP rank, weight [V/tp, h] this rank's vocabulary slice, target [*] global token ids.
    Columns >= vocab_size are padding. See `_LinearCrossEntropy` for the equal-weights contract."""
    shape = target.shape
    x2 = x.reshape(-1, x.shape[-1])
    if chunk_tokens is None:
        chunk_tokens = max(256, CHUNK_BYTES // (weight.shape[0] * x.element_size()) // 256 * 256)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss = _LinearCrossEntropy.apply(x2, weight, target.reshape(-1), vocab_size, ps, chunk_tokens, need_grad)
    return loss.view(shape)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 ps: ParallelState) -> torch.Tensor:
    """Per-token loss [*] for logits [*, V/tp] and targets [*]; columns >= vocab_size are padding."""
    shape = target.shape
    if ps.tp == 1 and _dense_device(logits):
        return _fused_dense(logits, target, vocab_size)
    loss = _VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            vocab_size, ps)
    return loss.view(shape)
