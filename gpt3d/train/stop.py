"""When training stops early: a stop signal, the time limit, or a streak of non-finite steps.

Every rank must take the same decision at the same iteration (a rank that stopped alone would leave its
peers waiting in a collective), so each step's three conditions are combined over all ranks in one
all-reduce. Reading that result on the host is a device synchronisation, so it is read right away only
where the loop needs the verdict or syncs anyway (log lines, validation, saves, the last step); elsewhere
it is read one step late, after the next step has been queued, so the host never waits for an idle
device. A late verdict still names the step it is about: a run that diverged stops with the same error
line and the same last good checkpoint (the one extra step it computed is never saved), and a stop signal
or the time limit takes effect at most one step later than it would with a read every step. Signals only
set a flag; the step in flight finishes.
"""
from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from typing import Optional
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..config import TrainingConfig
from ..errors import TrainingError
from ..parallel.state import ParallelState
from .step import StepResult


@dataclass
class Verdict:
    iteration: int             # the step this verdict is about
    reason: Optional[str]      # why to save and exit now (signal, time limit), or None
    streak: int                # consecutive non-finite steps up to `iteration` (on the worst rank)
    diverged: bool             # the streak reached the limit: stop without saving


@dataclass
class _Pending:
    """A check whose all-reduce is queued on the device and whose result is not read yet."""
    iteration: int
    flags: torch.Tensor                 # [stop, timed out, streak], on the host once `ready` has passed
    ready: Optional[torch.cuda.Event]   # None: already on the host (CPU)


class StopPolicy:
    def __init__(self, cfg: TrainingConfig, ps: ParallelState, fp16: bool):
        self.cfg, self.ps = cfg, ps
        # --check-for-nan-in-loss-and-grad stops at the first bad step (fp16 keeps its overflow rules)
        self.max_bad_steps = 1 if cfg.check_for_nan_in_loss_and_grad and not fp16 else cfg.max_skipped_steps
        self.stop_requested = False
        self.start = time.time()
        self.streak = torch.zeros(1, device=ps.device)   # consecutive non-finite steps, on the device
        self._pending: Optional[_Pending] = None
        self._late_reason: Optional[str] = None          # a stop reason found by `settle`, acted on next check

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT request a stop after the current step; the previous handlers come back on exit."""
        def handler(signum, frame):
            self.stop_requested = True
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def observe(self, result: StepResult) -> None:
        """Extend or reset the streak of non-finite steps (on the device, no host sync)."""
        bad = result.non_finite
        self.streak = (self.streak + bad) * bad

    def settle(self) -> Optional[Verdict]:
        """The verdict of a check left unread by the previous step, if any (read now that the current step
        is queued behind it). The loop raises if it diverged; a stop reason makes the next check exact."""
        if self._pending is None:
            return None
        verdict = self._read(self._pending)
        self._pending = None
        self._late_reason = self._late_reason or verdict.reason
        return verdict

    def check(self, iteration: int, exact: bool) -> Optional[Verdict]:
        """Combine this step's conditions over all ranks (one all-reduce, queued on every rank alike).
        exact: read the result now and return the verdict; otherwise return None and leave it for `settle`
        at the next step. The loop must ask for an exact verdict wherever it saves or finishes. A verdict
        about an earlier step comes back only if that one diverged."""
        late = self.settle()   # normally already done by the loop, which raises before logging this step
        if late is not None and late.diverged:
            return late
        pending = self._launch(iteration)
        if not (exact or self._late_reason):
            self._pending = pending
            return None
        verdict = self._read(pending)
        verdict.reason = verdict.reason or self._late_reason
        return verdict

    def _launch(self, iteration: int) -> _Pending:
        t, device = self.cfg, self.ps.device
        timed_out = t.exit_duration_in_mins is not None and time.time() - self.start > t.exit_duration_in_mins * 60
        host = torch.tensor([float(self.stop_requested), float(timed_out)])
        cuda = device.type == "cuda"
        flags = torch.cat([(host.pin_memory() if cuda else host).to(device, non_blocking=True), self.streak])
        if self.ps.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if not cuda:
            return _Pending(iteration, flags, None)
        out = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        out.copy_(flags, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Pending(iteration, out, ready)

    def _read(self, pending: _Pending) -> Verdict:
        if pending.ready is not None:
            pending.ready.synchronize()
        stop, timed_out, streak = pending.flags.tolist()
        t = self.cfg
        reason = "stop signal received" if stop else \
            f"--exit-duration-in-mins {t.exit_duration_in_mins} reached" if timed_out else None
        streak = int(streak)
        return Verdict(pending.iteration, reason, streak, bool(streak) and streak >= self.max_bad_steps > 0)


def divergence_error(verdict: Verdict, last_checkpoint: Optional[str]) -> TrainingError:
    last = verdict.iteration
    first = last - verdict.streak + 1
    where = f"iteration {first}" if verdict.streak == 1 else f"iterations {first}-{last}"
    return TrainingError(f"non-finite loss or gradients at {where} ({verdict.streak} consecutive skipped steps); "
                         f"stopped without saving, last good checkpoint: {last_checkpoint or 'none'}")
