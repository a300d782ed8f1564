"""The fault-injection test hook, GPT3D_FAULT_INJECT=RANK:ITERATION[:raise|nan|stop|hang].

Faults are tested end to end through real `gpt3d train` processes (tests/end_to_end/test_faults.py), which can only be
reached through the environment. The hook stays out of the training step: when the variable names this
rank, `install` wraps the trainer's step (at the start of that iteration `raise`: throw; `stop`: the process
sends itself SIGSTOP, as a frozen node would be; `hang`: the main thread sleeps forever, as one stuck in a
file system would) or its gradient buffer's `finish_grad_sync` (`nan`: poison this rank's gradients from
that iteration on) at start-up; otherwise, and in a job torchrun restarted, nothing is installed.
"""
from __future__ import annotations

import functools
import os
import signal
import threading
from typing import Optional

from ..errors import ConfigError

ENV = "GPT3D_FAULT_INJECT"
KINDS = ("raise", "nan", "stop", "hang")


def parse(spec: Optional[str], rank: int) -> Optional[tuple[int, str]]:
    """(iteration, kind) if `spec` targets `rank`, else None."""
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in KINDS):
        raise ConfigError(f"{ENV}={spec!r}: expected RANK:ITERATION[:{'|'.join(KINDS)}]")
    return (int(parts[1]), parts[2] if len(parts) == 3 else "raise") if int(parts[0]) == rank else None


def install(trainer) -> None:
    """Wrap `trainer.train_step` or `trainer.grads.finish_grad_sync` if GPT3D_FAULT_INJECT targets this rank."""
    fault = parse(os.environ.get(ENV), trainer.ps.rank)
    if fault is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return   # a fault of the first attempt only: a job restarted by torchrun --max-restarts runs clean
    at, kind = fault
    state, rank = trainer.state, trainer.ps.rank
    if kind != "nan":
        step = trainer.train_step

        @functools.wraps(step)
        def faulty_step(microbatches):
            if state.iteration + 1 == at:
                if kind == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                elif kind == "hang":
                    threading.Event().wait()
                else:
                    raise RuntimeError(f"injected fault on rank {rank} at iteration {at}")
            return step(microbatches)
        trainer.train_step = faulty_step
    else:
        grads = trainer.grads
        sync = grads.finish_grad_sync

        @functools.wraps(sync)
        def poisoned_sync():
            sync()
            if state.iteration + 1 >= at:   # the first range of this rank's shard: its optimizer sees NaN
                r = next(grads.local_ranges(), None)
                if r is not None:
                    grads.gradient(r).fill_(float("nan"))
        grads.finish_grad_sync = poisoned_sync
