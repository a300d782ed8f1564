"""Micro-batch schedules: one entry, `forward_backward`, for gradient accumulation with and without pipelining.

It runs every micro-batch of one global step through this rank's model chunk(s): plain accumulation
without pipelining; 1F1B with it (warm-up forwards, steady one-forward-one-backward, cool-down backwards);
interleaved 1F1B with several chunks per stage; activations move between stages by batched isend/irecv.
The schedules know nothing of the model: they call `forward_step(chunk, micro_batch, input) -> (output,
loss)` (output on inner chunks, a scalar loss on the last), scale each loss for backward and average the
losses in one place (`_Step`), and run every backward but the last micro-batch's under `no_sync()`, the
gradient buffer's handle that holds its reductions back until the last micro-batch.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .layout import check_interleaved
from .state import ParallelState

# (chunk, micro-batch, input from the previous stage or None) -> (output for the next stage, loss or None)
ForwardStep = Callable[[nn.Module, dict, Optional[torch.Tensor]],
                       tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


def forward_backward(chunks: list[nn.Module], microbatches: list[dict], ps: ParallelState, *,
                     forward_step: ForwardStep, forward_only: bool, loss_scale: Optional[torch.Tensor] = None,
                     no_sync: Callable[[], ContextManager] = contextlib.nullcontext,
                     hidden_shape: Optional[tuple] = None,
                     dtype: torch.dtype = torch.float32, sum_gradients: bool = False) -> Optional[torch.Tensor]:
    """Forward (and unless `forward_only`, backward) of every micro-batch; returns the mean loss over the
    micro-batches on the last stage, None elsewhere. Gradients are those of that mean (times `loss_scale`),
    or with `sum_gradients` of the micro-batches' summed losses (DeepSpeed's pipeline engine's gradients).
    `hidden_shape`/`dtype`: the activations sent between stages (needed with pipelining)."""
    step = _Step(chunks, microbatches, forward_step, forward_only, loss_scale, no_sync, sum_gradients)
    if ps.pp == 1:
        _no_pipelining(step)
    elif len(chunks) == 1:
        _one_f_one_b(step, ps, _P2P(ps, hidden_shape, dtype))
    else:
        _interleaved(step, ps, _P2P(ps, hidden_shape, dtype, ring=True))
    return step.mean_loss()


class _Step:
    """What every schedule shares: the model call, the losses, and backward (held back by no_sync)."""

    def __init__(self, chunks, microbatches, forward_step: ForwardStep, forward_only: bool,
                 loss_scale: Optional[torch.Tensor], no_sync: Callable[[], ContextManager],
                 sum_gradients: bool = False):
        self.chunks, self.microbatches, self.forward_step = chunks, microbatches, forward_step
        self.forward_only, self.loss_scale, self.no_sync = forward_only, loss_scale, no_sync
        self.m = len(microbatches)
        self.divisor = 1 if sum_gradients else self.m   # of each loss, for backward
        self.losses: list[torch.Tensor] = []

    def forward(self, c: int, i: int, x: Optional[torch.Tensor]) -> torch.Tensor:
        """Chunk c on micro-batch i: the activation for the next stage, or on the last chunk the loss as
        backward needs it (scaled by the loss scale, divided by the number of micro-batches unless summed)."""
        with torch.set_grad_enabled(not self.forward_only):
            y, loss = self.forward_step(self.chunks[c], self.microbatches[i], x)
        if loss is None:
            return y
        self.losses.append(loss.detach())
        return loss * self.loss_scale / self.divisor if self.loss_scale is not None else loss / self.divisor

    def backward(self, y: torch.Tensor, gy: Optional[torch.Tensor], last_microbatch: bool) -> None:
        """gy: the gradient received from the next stage (None on the last chunk, which starts from y)."""
        with contextlib.nullcontext() if last_microbatch else self.no_sync():
            torch.autograd.backward(y, grad_tensors=gy)

    def mean_loss(self) -> Optional[torch.Tensor]:
        return torch.stack(self.losses).mean() if self.losses else None


class _P2P:
    """Point-to-point between neighbouring stages with batched isend/irecv."""

    def __init__(self, ps: ParallelState, shape: tuple, dtype: torch.dtype, ring: bool = False):
        self.ps, self.shape, self.dtype = ps, shape, dtype
        r, p = ps.pp_rank, ps.pp
        self.prev = ps.pp_ranks[(r - 1) % p] if r > 0 or ring else None
        self.next = ps.pp_ranks[(r + 1) % p] if r < p - 1 or ring else None

    def __call__(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        # Activations (forward direction) first, then gradients, on every rank: with the interleaved ring at
        # PP=2 `prev` and `next` are the same peer, and point-to-point messages match in posting order.
        ops, from_prev, from_next = [], None, None
        if send_next is not None and self.next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.contiguous(), self.next))
        if recv_prev and self.prev is not None:
            from_prev = torch.empty(self.shape, dtype=self.dtype, device=self.ps.device)
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev))
        if send_prev is not None and self.prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), self.prev))
        if recv_next and self.next is not None:
            from_next = torch.empty(self.shape, dtype=self.dtype, device=self.ps.device)
            ops.append(dist.P2POp(dist.irecv, from_next, self.next))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        if from_prev is not None:
            from_prev.requires_grad_()
        return from_prev, from_next


def _no_pipelining(step: _Step) -> None:
    for i in range(step.m):
        y = step.forward(0, i, None)
        if not step.forward_only:
            step.backward(y, None, last_microbatch=i == step.m - 1)


def _one_f_one_b(step: _Step, ps: ParallelState, p2p: _P2P) -> None:
    """Non-interleaved 1F1B: stage r runs P-r-1 warm-up forwards, then alternates, then drains.

    At most P-r micro-batches' activations are alive on stage r (vs all M with GPipe).
    """
    m, forward_only = step.m, step.forward_only
    inputs, outputs = [], []
    done_backward = [0]

    def backward(x, y, gy) -> Optional[torch.Tensor]:
        step.backward(y, gy, last_microbatch=done_backward[0] == m - 1)
        done_backward[0] += 1
        return x.grad if x is not None else None

    warmup = m if forward_only else min(ps.pp - ps.pp_rank - 1, m)
    for i in range(warmup):
        x, _ = p2p(recv_prev=True)
        y = step.forward(0, i, x)
        p2p(send_next=None if ps.is_last_stage else y.detach())
        if not forward_only:
            inputs.append(x)
            outputs.append(y)
    remaining = m - warmup
    x = p2p(recv_prev=True)[0] if remaining else None
    for i in range(remaining):
        y = step.forward(0, warmup + i, x)
        send = None if ps.is_last_stage else y.detach()
        _, gy = p2p(send_next=send, recv_next=not ps.is_last_stage)
        inputs.append(x)
        outputs.append(y)
        gx = backward(inputs.pop(0), outputs.pop(0), gy)
        if i == remaining - 1:
            p2p(send_prev=gx)
        else:
            x, _ = p2p(send_prev=gx, recv_prev=True)
    for _ in range(len(inputs)):
        _, gy = p2p(recv_next=not ps.is_last_stage)
        gx = backward(inputs.pop(0), outputs.pop(0), gy)
        p2p(send_prev=gx)


def _interleaved(step: _Step, ps: ParallelState, p2p: _P2P) -> None:
    """Interleaved 1F1B (Megatron): V model chunks per stage cut the bubble to (P-1)/(V*M).

    Virtual step k runs chunk (k mod P*V) // P on micro-batch (k // P*V) * P + k mod P; activations
    travel a ring (the last stage feeds chunk v+1 of the first stage).
    """
    p, r, v_count, m, forward_only = ps.pp, ps.pp_rank, len(step.chunks), step.m, step.forward_only
    check_interleaved(m, p, v_count)   # refused at start (parallel/layout.py); kept for direct callers
    total = m * v_count
    first, last = ps.is_first_stage, ps.is_last_stage
    inputs = [[] for _ in range(v_count)]
    outputs = [[] for _ in range(v_count)]
    grads = [[] for _ in range(v_count)]

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (p * v_count)) // p
        return c if forward else v_count - 1 - c

    def mb_of(k: int) -> int:
        return (k // (p * v_count)) * p + k % p

    def fwd(k: int) -> Optional[torch.Tensor]:
        c = chunk_of(k, True)
        is_first, is_last = first and c == 0, last and c == v_count - 1
        if is_first and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)  # the embedding chunk reads tokens, nothing is received
        y = step.forward(c, mb_of(k), inputs[c][-1])
        outputs[c].append(y)
        if forward_only:
            inputs[c].pop()
            outputs[c].pop()
        return None if is_last else y.detach()

    def bwd(k: int) -> Optional[torch.Tensor]:
        c = chunk_of(k, False)
        if last and c == v_count - 1 and not grads[c]:
            grads[c].append(None)   # the loss chunk starts backward from the loss
        x, y, gy = inputs[c].pop(0), outputs[c].pop(0), grads[c].pop(0)
        step.backward(y, None if (last and c == v_count - 1) else gy, last_microbatch=mb_of(k) == m - 1)
        return None if (first and c == 0) or x is None else x.grad

    all_warmup = forward_only or m == p
    warmup = total if all_warmup else min(total, (p - r - 1) * 2 + (v_count - 1) * p)
    remaining = total - warmup
    if not first:
        inputs[0].append(p2p(recv_prev=True)[0])
    for k in range(warmup):
        out = fwd(k)
        nxt = chunk_of(k + 1, True)
        recv_prev = not (first and nxt == 0) and k != total - 1
        if k == warmup - 1 and not all_warmup:
            x, gy = p2p(send_next=out, recv_prev=recv_prev, recv_next=not last)
            grads[v_count - 1].append(gy)
        else:
            x, _ = p2p(send_next=out, recv_prev=recv_prev)
        if recv_prev:
            inputs[nxt].append(x)
    for k in range(remaining):
        fk = k + warmup
        out = fwd(fk)
        gx = bwd(k)
        if first:
            nf = chunk_of(fk - (p - 1), True)
            recv_prev = nf != v_count - 1
            nf += 1
        else:
            nf, recv_prev = chunk_of(fk + 1, True), True
        if last:
            nb = chunk_of(k - (p - 1), False)
            recv_next = nb != 0
            nb -= 1
        else:
            nb, recv_next = chunk_of(k + 1, False), True
        if k == remaining - 1:
            recv_prev = False
        x, gy = p2p(send_next=out, send_prev=gx, recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            inputs[nf].append(x)
        if recv_next:
            grads[nb].append(gy)
    if not forward_only:
        if all_warmup:
            if not last:
                grads[v_count - 1].append(p2p(recv_next=True)[1])
        for k in range(remaining, total):
            gx = bwd(k)
            nb = chunk_of(k + 1, False)
            recv_next = not (last and nb == v_count - 1) and k != total - 1
            _, gy = p2p(send_prev=gx, recv_next=recv_next)
            if recv_next:
                grads[nb].append(gy)
