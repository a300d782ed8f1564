"""Trace gpt3d's real pipeline schedule on P stages in one process, then time the trace on a simulated clock.

Checking a schedule by wall-clock time fails on a busy machine, so tests check its order of operations instead:
each stage runs the public `forward_backward` in its own thread, with torch.distributed's point-to-point calls
replaced by in-process queues (a message is matched FIFO per sender/receiver pair, as gloo and NCCL do) and model
chunks that log every forward and backward. The per-stage logs are then replayed on a simulated clock where a
chunk's forward takes 1 unit, its backward 2, messages are free and a receive waits for its send: that gives the
step time, hence the bubble, that the schedule's order implies. Everything that knows the schedule's interfaces
lives here, so a change in the pipeline code is adapted in one place. benchmarks/pipeline_bubble.py keeps timing
the real thing.
"""
from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from gpt3d.parallel.pipeline import forward_backward
from gpt3d.parallel.state import ParallelState
from gpt3d.train.step import gpt_forward_step

HIDDEN = (1, 2, 4)   # [b, s, h] of the activations between stages; channel 0 carries the micro-batch id,
                     # channel 1 the number of chunks the micro-batch went through
F_TIME, B_TIME = Fraction(1), Fraction(2)
WAIT_S = 60.0        # a receive that gets nothing for this long means the schedule deadlocked


class FakeP2P:
    """In-process stand-in for dist.isend/irecv/send/recv/P2POp/batch_isend_irecv between stage threads."""

    def __init__(self, logs: list):
        self.logs = logs                 # per rank: the event list that sends/receives are appended to
        self.channels: dict = {}         # (src, dst) -> Queue of (k, tensor)
        self.posted: dict = {}           # (src, dst, "send" | "recv") -> messages posted so far
        self.lock = threading.Lock()
        self.local = threading.local()   # .rank of the calling stage thread
        self.abort = threading.Event()

    def _channel(self, src: int, dst: int) -> queue.Queue:
        with self.lock:
            return self.channels.setdefault((src, dst), queue.Queue())

    def _count(self, src: int, dst: int, kind: str) -> int:
        with self.lock:
            k = self.posted.get((src, dst, kind), 0)
            self.posted[(src, dst, kind)] = k + 1
            return k

    # --- the torch.distributed surface -------------------------------------------------------------------
    def isend(self, tensor: torch.Tensor, dst: int, group=None, tag: int = 0):
        me = self.local.rank
        k = self._count(me, dst, "send")
        self.logs[me].append(("send", dst, k))
        self._channel(me, dst).put((k, tensor.detach().clone()))
        return _Done()

    def irecv(self, tensor: torch.Tensor, src: int, group=None, tag: int = 0):
        me = self.local.rank
        return _Recv(self, tensor, src, me, self._count(src, me, "recv"))

    def send(self, tensor, dst, group=None, tag=0):
        self.isend(tensor, dst).wait()

    def recv(self, tensor, src, group=None, tag=0):
        self.irecv(tensor, src).wait()

    def batch_isend_irecv(self, ops: list) -> list:
        return [op.op(op.tensor, op.peer) for op in ops]

    def p2p_op(self, op, tensor, peer=None, group=None, tag=0):
        return _Op(op, tensor, peer)

    @contextmanager
    def installed(self):
        names = {"isend": self.isend, "irecv": self.irecv, "send": self.send, "recv": self.recv,
                 "batch_isend_irecv": self.batch_isend_irecv, "P2POp": self.p2p_op}
        saved = {n: getattr(dist, n) for n in names}
        for n, f in names.items():
            setattr(dist, n, f)
        try:
            yield self
        finally:
            for n, f in saved.items():
                setattr(dist, n, f)

    def leftover(self) -> dict:
        """Messages sent but never received, per (src, dst)."""
        return {c: q.qsize() for c, q in self.channels.items() if q.qsize()}


@dataclass
class _Op:
    op: object
    tensor: torch.Tensor
    peer: int


class _Done:
    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _Recv:
    def __init__(self, p2p: FakeP2P, tensor: torch.Tensor, src: int, dst: int, k: int):
        self.p2p, self.tensor, self.src, self.dst, self.k, self.done = p2p, tensor, src, dst, k, False

    def wait(self, timeout=None) -> bool:
        if self.done:
            return True
        ch, waited = self.p2p._channel(self.src, self.dst), 0.0
        while True:
            try:
                k, data = ch.get(timeout=0.2)
                break
            except queue.Empty:
                waited += 0.2
                if self.p2p.abort.is_set() or waited > WAIT_S:
                    raise RuntimeError(f"stage {self.dst}: receive #{self.k} from stage {self.src} never came "
                                       "(schedule deadlock)") from None
        assert k == self.k, (k, self.k)
        with torch.no_grad():
            self.tensor.copy_(data)
        self.p2p.logs[self.dst].append(("recv", self.src, self.k))
        self.done = True
        return True

    def is_completed(self) -> bool:
        return self.done


class _Logged(torch.autograd.Function):
    """Identity that logs ('F', virtual stage, micro-batch) and, in backward, ('B', ..., outside no_sync)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, chunk: TracedChunk, mb: int) -> torch.Tensor:
        ctx.chunk, ctx.mb = chunk, mb
        chunk.log.append(("F", chunk.vstage, mb))
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        c = ctx.chunk
        c.log.append(("B", c.vstage, ctx.mb, c.last_flag[0]))
        return g, None, None


class TracedChunk(nn.Module):
    """A model chunk with GPTModel's calling convention (and pre/post_process flags, so training's own
    forward_step drives it) that checks what it receives and logs what it runs."""

    def __init__(self, vstage: int, num_vstages: int, log: list, last_flag: list, errors: list):
        super().__init__()
        self.vstage, self.log, self.last_flag, self.errors = vstage, log, last_flag, errors
        self.pre_process, self.post_process = vstage == 0, vstage == num_vstages - 1
        self.w = nn.Parameter(torch.zeros(HIDDEN[-1]))
        self.register_buffer("bump", torch.tensor([0.0, 1.0] + [0.0] * (HIDDEN[-1] - 2)))

    def forward(self, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        if hidden is None:   # the first virtual stage embeds the tokens (all equal to the micro-batch id)
            x = torch.zeros(HIDDEN)
            x[..., 0] = tokens.float()
        else:
            x = hidden                                                               # [b, s, h]
        mb, visited = int(x[0, 0, 0]), int(x[0, 0, 1])
        if (hidden is None) != (self.vstage == 0) or visited != self.vstage:
            self.errors.append(f"virtual stage {self.vstage} got micro-batch {mb} after {visited} chunks")
        y = _Logged.apply(x + self.w, self, mb) + self.bump   # + w first: the backward reaches every chunk
        return y.mean(-1) if labels is not None else y                               # [b, s] per-token loss


@dataclass
class Trace:
    pp: int
    v: int
    m: int
    logs: list                                   # per stage: events in program order
    losses: list                                 # per stage: each micro-batch's loss, as forward_step gave it
    mean_loss: list                              # per stage: what forward_backward returned
    grads: list                                  # per stage: each chunk's w.grad
    errors: list = field(default_factory=list)   # wrong inputs seen by chunks, stray messages

    def simulate(self) -> list:
        """Each stage's finish time on the simulated clock (F = 1, B = 2 per chunk, free messages)."""
        clock = [Fraction(0)] * self.pp
        pos, sent = [0] * self.pp, {}
        while any(pos[r] < len(self.logs[r]) for r in range(self.pp)):
            progressed = False
            for r in range(self.pp):
                while pos[r] < len(self.logs[r]):
                    ev = self.logs[r][pos[r]]
                    if ev[0] == "F":
                        clock[r] += F_TIME
                    elif ev[0] == "B":
                        clock[r] += B_TIME
                    elif ev[0] == "send":
                        sent[(r, ev[1], ev[2])] = clock[r]
                    else:   # recv: waits for the matching send
                        key = (ev[1], r, ev[2])
                        if key not in sent:
                            break
                        clock[r] = max(clock[r], sent[key])
                    pos[r] += 1
                    progressed = True
            assert progressed, "simulated schedule deadlocks"
        return clock

    def bubble(self) -> Fraction:
        """(step time - ideal) / ideal, Megatron's definition; ideal = every chunk's F and B back to back."""
        ideal = self.m * self.v * (F_TIME + B_TIME)
        return (max(self.simulate()) - ideal) / ideal

    def in_flight(self, stage: int) -> int:
        """Most (chunk, micro-batch) activations alive at once on `stage` (forwarded, not yet backwarded)."""
        alive = peak = 0
        for ev in self.logs[stage]:
            if ev[0] in ("F", "B"):
                alive += 1 if ev[0] == "F" else -1
                peak = max(peak, alive)
        return peak


def trace_schedule(pp: int, m: int, v: int = 1, forward_only: bool = False) -> Trace:
    """Run `forward_backward` on `pp` stage threads with `v` chunks per stage and `m` micro-batches."""
    logs = [[] for _ in range(pp)]
    p2p = FakeP2P(logs)
    errors: list = []
    losses, mean_loss, grads, failures = [None] * pp, [None] * pp, [None] * pp, []

    def stage(rank: int) -> None:
        p2p.local.rank = rank
        try:
            ps = ParallelState(pp=pp, rank=rank, pp_ranks=list(range(pp)))
            flag = [True]   # False inside no_sync: a backward whose gradient reduction is held back
            chunks = [TracedChunk(c * pp + rank, pp * v, logs[rank], flag, errors) for c in range(v)]
            mbs = [{"tokens": torch.full(HIDDEN[:2], i), "labels": torch.full(HIDDEN[:2], i)} for i in range(m)]
            seen: list = []

            def forward_step(chunk, micro_batch, x):
                out, loss = gpt_forward_step(chunk, micro_batch, x)
                if loss is not None:
                    seen.append(float(loss.detach()))
                return out, loss

            @contextmanager
            def no_sync():
                flag[0] = False
                try:
                    yield
                finally:
                    flag[0] = True

            out = forward_backward(chunks, mbs, ps, forward_step=forward_step, forward_only=forward_only,
                                   loss_scale=None, no_sync=no_sync, hidden_shape=HIDDEN, dtype=torch.float32)
            losses[rank], mean_loss[rank] = seen, None if out is None else float(out)
            grads[rank] = [None if c.w.grad is None else c.w.grad.clone() for c in chunks]
        except BaseException as e:  # noqa: BLE001 - reported by the caller, and the other stages stop waiting
            failures.append(f"stage {rank}: {type(e).__name__}: {e}")
            p2p.abort.set()

    with p2p.installed():
        threads = [threading.Thread(target=stage, args=(r,), daemon=True) for r in range(pp)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 2)
    if failures or any(t.is_alive() for t in threads):
        raise AssertionError("schedule failed: " + "; ".join(failures or ["a stage never finished"]))
    if p2p.leftover():
        errors.append(f"messages never received: {p2p.leftover()}")
    return Trace(pp, v, m, logs, losses, mean_loss, grads, errors)
