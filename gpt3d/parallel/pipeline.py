"""Micro-batch schedules: one entry, `forward_backward`, for gradient accumulation with and without pipelining.

The order of a stage's forwards and backwards is one pure function, `schedule_ops` (Megatron-core's schedule
table): the executor walks that list, and the planner (gpt3d/plan/schedule.py) sizes memory and time from the
same list, so the order has one home. It runs every micro-batch of one global step through this rank's model
chunk(s): plain accumulation
without pipelining; 1F1B with it (warm-up forwards, steady one-forward-one-backward, cool-down backwards);
interleaved 1F1B with several chunks per stage; activations move between stages by batched isend/irecv.
The schedules know nothing of the model: they call `forward_step(chunk, micro_batch, input) -> (output,
loss)` (output on inner chunks, a scalar loss on the last), scale each loss for backward and average the
losses in one place (`_Step`), and run every backward but the last micro-batch's under `no_sync()`, the
gradient buffer's handle that holds its reductions back until the last micro-batch.
"""
from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import NamedTuple, Optional
from collections.abc import Callable

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
                     no_sync: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                     hidden_shape: Optional[tuple] = None,
                     dtype: torch.dtype = torch.float32, sum_gradients: bool = False) -> Optional[torch.Tensor]:
    """Forward (and unless `forward_only`, backward) of every micro-batch; returns the mean loss over the
    micro-batches on the last stage, None elsewhere. Gradients are those of that mean (times `loss_scale`),
    or with `sum_gradients` of the micro-batches' summed losses (DeepSpeed's pipeline engine's gradients).
    `hidden_shape`/`dtype`: the activations sent between stages (needed with pipelining)."""
    step = _Step(chunks, microbatches, forward_step, forward_only, loss_scale, no_sync, sum_gradients)
    if ps.pp > 1:
        check_interleaved(step.m, ps.pp, len(chunks))   # refused at start (parallel/layout.py); kept for direct callers
    ops = schedule_ops(ps.pp, ps.pp_rank, len(chunks), step.m, forward_only=forward_only)
    if ps.pp == 1:
        _no_pipelining(step, ops)
    elif hidden_shape is None:
        raise ValueError("pipelining needs hidden_shape (the activation sent between stages)")
    elif len(chunks) == 1:
        _one_f_one_b(step, ps, _P2P(ps, hidden_shape, dtype), ops)
    else:
        _interleaved(step, ps, _P2P(ps, hidden_shape, dtype, ring=True), ops)
    return step.mean_loss()


class Op(NamedTuple):
    """One compute step of a stage: "F" (forward) or "B" (backward) of model chunk `chunk` on micro-batch `micro`."""
    kind: str
    chunk: int
    micro: int


def virtual_chunk(k: int, pp: int, vp: int, forward: bool = True) -> int:
    """The model chunk of virtual step k in the interleaved schedule (reversed for backwards)."""
    c = (k % (pp * vp)) // pp
    return c if forward else vp - 1 - c


def virtual_micro(k: int, pp: int, vp: int) -> int:
    """The micro-batch of virtual step k in the interleaved schedule."""
    return (k // (pp * vp)) * pp + k % pp


def schedule_ops(pp: int, rank: int, vp: int, m: int, forward_only: bool = False) -> list[Op]:
    """The forwards and backwards stage `rank` runs in one step, in order (the schedule table).

    No pipelining: forward and backward of each micro-batch in turn. 1F1B (vp = 1): pp-rank-1 warm-up
    forwards, then one forward / one backward, then the remaining backwards. Interleaved (Megatron):
    (pp-rank-1)*2 + (vp-1)*pp warm-up forwards (all of them when m == pp); virtual step k works on chunk
    `virtual_chunk(k)` and micro-batch `virtual_micro(k)`. `forward_only`: the forwards alone, in that order.
    The first `warmup_forwards` of them are the warm-up, before the steady one-forward-one-backward."""
    warm = warmup_forwards(pp, rank, vp, m)
    if pp == 1:
        ops = [op for i in range(m) for op in (Op("F", 0, i), Op("B", 0, i))]
    elif vp == 1:
        ops = [Op("F", 0, i) for i in range(warm)]
        for i in range(m - warm):
            ops += [Op("F", 0, warm + i), Op("B", 0, i)]
        ops += [Op("B", 0, i) for i in range(m - warm, m)]
    else:
        total = m * vp

        def fwd(k: int) -> Op:
            return Op("F", virtual_chunk(k, pp, vp), virtual_micro(k, pp, vp))

        def bwd(k: int) -> Op:
            return Op("B", virtual_chunk(k, pp, vp, forward=False), virtual_micro(k, pp, vp))

        ops = [fwd(k) for k in range(warm)]
        for k in range(total - warm):
            ops += [fwd(k + warm), bwd(k)]
        ops += [bwd(k) for k in range(total - warm, total)]
    return [op for op in ops if op.kind == "F"] if forward_only else ops


def warmup_forwards(pp: int, rank: int, vp: int, m: int, forward_only: bool = False) -> int:
    """Forwards stage `rank` runs before its first steady-state forward/backward pair (all of them forward-only)."""
    if forward_only:
        return m * vp
    if pp == 1:
        return 0
    if vp == 1:
        return min(pp - rank - 1, m)
    total = m * vp
    return total if m == pp else min(total, (pp - rank - 1) * 2 + (vp - 1) * pp)


class _Step:
    """What every schedule shares: the model call, the losses, and backward (held back by no_sync)."""

    def __init__(self, chunks, microbatches, forward_step: ForwardStep, forward_only: bool,
                 loss_scale: Optional[torch.Tensor], no_sync: Callable[[], AbstractContextManager],
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
            assert y is not None, "forward_step returns the activation when it returns no loss"
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


def _no_pipelining(step: _Step, ops: list[Op]) -> None:
    alive = {}
    for op in ops:
        if op.kind == "F":
            y = step.forward(op.chunk, op.micro, None)
            if not step.forward_only:
                alive[op.micro] = y
        else:
            step.backward(alive.pop(op.micro), None, last_microbatch=op.micro == step.m - 1)


def _one_f_one_b(step: _Step, ps: ParallelState, p2p: _P2P, ops: list[Op]) -> None:
    """Non-interleaved 1F1B (`schedule_ops`' order): stage r runs P-r-1 warm-up forwards, then alternates, then
    drains. At most P-r micro-batches' activations are alive on stage r (vs all M with GPipe).
    """
    m, forward_only = step.m, step.forward_only
    fwd = [op for op in ops if op.kind == "F"]
    bwd = iter([op for op in ops if op.kind == "B"])
    inputs, outputs = [], []

    def backward(x, y, gy) -> Optional[torch.Tensor]:
        step.backward(y, gy, last_microbatch=next(bwd).micro == m - 1)
        return x.grad if x is not None else None

    warmup = warmup_forwards(ps.pp, ps.pp_rank, 1, m, forward_only)
    for i in range(warmup):
        x, _ = p2p(recv_prev=True)
        y = step.forward(fwd[i].chunk, fwd[i].micro, x)
        p2p(send_next=None if ps.is_last_stage else y.detach())
        if not forward_only:
            inputs.append(x)
            outputs.append(y)
    remaining = m - warmup
    x = p2p(recv_prev=True)[0] if remaining else None
    for i in range(remaining):
        y = step.forward(fwd[warmup + i].chunk, fwd[warmup + i].micro, x)
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


def _interleaved(step: _Step, ps: ParallelState, p2p: _P2P, ops: list[Op]) -> None:
    """Interleaved 1F1B (Megatron): V model chunks per stage cut the bubble to (P-1)/(V*M).

    The k-th forward and k-th backward are those of `schedule_ops`; what arrives from a neighbour belongs to
    the chunk its own schedule ran (`virtual_chunk`). Activations travel a ring (the last stage feeds chunk
    v+1 of the first stage).
    """
    p, v_count, m, forward_only = ps.pp, len(step.chunks), step.m, step.forward_only
    total = m * v_count
    first, last = ps.is_first_stage, ps.is_last_stage
    f_ops = [op for op in ops if op.kind == "F"]
    b_ops = [op for op in ops if op.kind == "B"]
    inputs: list[list] = [[] for _ in range(v_count)]
    outputs: list[list] = [[] for _ in range(v_count)]
    grads: list[list] = [[] for _ in range(v_count)]

    def chunk_of(k: int, forward: bool) -> int:
        return virtual_chunk(k, p, v_count, forward)

    def fwd(k: int) -> Optional[torch.Tensor]:
        c = f_ops[k].chunk
        is_first, is_last = first and c == 0, last and c == v_count - 1
        if is_first and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)  # the embedding chunk reads tokens, nothing is received
        y = step.forward(c, f_ops[k].micro, inputs[c][-1])
        outputs[c].append(y)
        if forward_only:
            inputs[c].pop()
            outputs[c].pop()
        return None if is_last else y.detach()

    def bwd(k: int) -> Optional[torch.Tensor]:
        c = b_ops[k].chunk
        if last and c == v_count - 1 and not grads[c]:
            grads[c].append(None)   # the loss chunk starts backward from the loss
        x, y, gy = inputs[c].pop(0), outputs[c].pop(0), grads[c].pop(0)
        step.backward(y, None if (last and c == v_count - 1) else gy, last_microbatch=b_ops[k].micro == m - 1)
        return None if (first and c == 0) or x is None else x.grad

    warmup = warmup_forwards(p, ps.pp_rank, v_count, m, forward_only)
    all_warmup = warmup == total
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
