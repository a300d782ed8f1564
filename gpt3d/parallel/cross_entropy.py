"""Cross entropy over vocabulary-split logits, never gathering the full logits.

Each TP rank holds logits for a slice of the vocabulary: the max, the target
logit and the sum of exponentials are reduced across TP (three small all-reduces
of [tokens] tensors) instead of all-gathering [tokens, vocab]. Padded vocabulary
columns (their count depends on TP) are masked out, so the loss is identical
for every TP size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, ps):
        # logits: [N, V_local] (any float dtype); target: [N] global token ids
        x = logits.float()
        per_rank = x.shape[-1]
        start = ps.tp_rank * per_rank
        real_here = max(0, min(per_rank, vocab_size - start))
        if real_here < per_rank:
            x = x.clone() if x.data_ptr() == logits.data_ptr() else x
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
    return F.cross_entropy(logits[:, :vocab_size].float(), target, reduction="none")


_compiled_dense = None


def _fused_dense(logits, target, vocab_size):
    """TP=1 on GPU: one compiled kernel reads the bf16 logits once (online log-sum-exp) and the backward
    writes bf16 gradients directly, instead of materialising several fp32 copies of [tokens, vocab]."""
    global _compiled_dense
    if _compiled_dense is None:
        _compiled_dense = torch.compile(_dense_cross_entropy, dynamic=False)
    return _compiled_dense(logits, target, vocab_size)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 ps: ParallelState) -> torch.Tensor:
    """Per-token loss [*] for logits [*, V/tp] and targets [*]; columns >= vocab_size are padding."""
    shape = target.shape
    if ps.tp == 1 and logits.is_cuda:
        return _fused_dense(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), vocab_size).view(shape)
    loss = _VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            vocab_size, ps)
    return loss.view(shape)
