"""When training stops early: a stop signal, the time limit, or a streak of non-finite steps.

Every rank must take the same decision at the same iteration (a rank that stopped alone would leave its
peers waiting in a collective), so `check` combines the three conditions of all ranks in one all-reduce,
the step's only host synchronisation besides logging. Signals only set a flag; the step in flight finishes.
"""
from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..config import TrainingConfig
from ..errors import TrainingError
from ..parallel.state import ParallelState
from .step import StepResult


@dataclass
class Verdict:
    reason: Optional[str]      # why to save and exit now (signal, time limit), or None
    streak: int                # consecutive non-finite steps so far (on the worst rank)
    diverged: bool             # the streak reached the limit: stop without saving


class StopPolicy:
    def __init__(self, cfg: TrainingConfig, ps: ParallelState, fp16: bool):
        self.cfg, self.ps = cfg, ps
        # --check-for-nan-in-loss-and-grad stops at the first bad step (fp16 keeps its overflow rules)
        self.max_bad_steps = 1 if cfg.check_for_nan_in_loss_and_grad and not fp16 else cfg.max_skipped_steps
        self.stop_requested = False
        self.start = time.time()
        self.streak = torch.zeros(1, device=ps.device)   # consecutive non-finite steps, on the device

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

    def check(self) -> Verdict:
        """One host sync and one all-reduce: the same verdict on every rank."""
        t = self.cfg
        timed_out = t.exit_duration_in_mins is not None and time.time() - self.start > t.exit_duration_in_mins * 60
        flags = torch.cat([torch.tensor([float(self.stop_requested), float(timed_out)], device=self.ps.device),
                           self.streak])
        if self.ps.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, timed_out, streak = flags.tolist()
        reason = "stop signal received" if stop else \
            f"--exit-duration-in-mins {t.exit_duration_in_mins} reached" if timed_out else None
        streak = int(streak)
        return Verdict(reason, streak, bool(streak) and streak >= self.max_bad_steps > 0)


def divergence_error(verdict: Verdict, iteration: int, last_checkpoint: Optional[str]) -> TrainingError:
    first = iteration - verdict.streak + 1
    where = f"iteration {first}" if verdict.streak == 1 else f"iterations {first}-{iteration}"
    return TrainingError(f"non-finite loss or gradients at {where} ({verdict.streak} consecutive skipped steps); "
                         f"stopped without saving, last good checkpoint: {last_checkpoint or 'none'}")
