"""The step watchdog: a rank that makes no progress in time ends the job, saying who is stuck and where.

Collectives have a deadline of their own (every process group gets --distributed-timeout-minutes,
parallel/state.py), but not every hang is a collective's: a rank can be stuck reading data, on a file
system, in a device kernel or a deadlock, and a frozen (SIGSTOP) or unreachable rank leaves its peers
waiting with no clue which of them is the culprit. So a thread on every rank watches the loop's progress
(each training step, each validation batch, each save) and, when none comes within the timeout, prints one
`gpt3d: error:` line naming this rank, the ranks that went silent and where every live rank's main thread
is, dumps this rank's threads' Python stacks (one write a thread) and exits with `HangError.exit_code` (4), so
torchrun (`--max-restarts`) or a scheduler restarts the job from the last checkpoint. The first step and the
first validation get `FIRST_STEP_EXTRA_S` more (compilation, communicator set-up), as loading a checkpoint,
building the data index and each save get `SLOW_PHASE_EXTRA_S` more.

Every `interval` seconds each rank publishes a heartbeat (wall time, last progress, the gpt3d function its
main thread is in) to torchrun's store; a rank whose heartbeat is older than half the timeout is reported as
stopped, dead or unreachable. A rank that fires raises an alarm in the store; every other live rank then dumps
its own stacks and exits as well, so the log holds each live rank's stack. A C-level faulthandler timer, armed
a little later than the thread's deadline, is the backstop for a hang that holds the GIL (no Python runs).
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Optional
from collections.abc import Iterator

from ..errors import HangError, error_line

FIRST_STEP_EXTRA_S = {True: 30 * 60.0, False: 5 * 60.0}   # by --compile: compilation, autotuning, NCCL set-up
SLOW_PHASE_EXTRA_S = 30 * 60.0      # a checkpoint load or save, the data index: large files, slow file systems
BACKSTOP_S = 30.0                   # the C timer fires this long after the thread would have
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_thread_place() -> str:
    """The innermost gpt3d function the main thread is in, e.g. 'finish_grad_sync (optim/grad_buffer.py:194)'."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE + os.sep) and not path.endswith(os.sep + "watchdog.py"):
            return f"{frame.f_code.co_name} ({os.path.relpath(path, _PACKAGE)}:{frame.f_lineno})"
        frame = frame.f_back
    return "outside gpt3d"


def _ranks(ranks: list[int]) -> str:
    """[0, 2, 3, 4, 7] -> 'ranks 0, 2-4, 7'."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    text = ", ".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in runs)
    return f"rank{'s' * (len(ranks) > 1)} {text}"


class Heartbeats:
    """This job's heartbeats in torchrun's store (MASTER_ADDR:MASTER_PORT), under a prefix of this attempt:
    one key per rank, `{"t": wall time, "what": last progress, "where": main thread's place}`, and the alarm."""

    def __init__(self, rank: int, world: int, interval: float):
        import torch.distributed as dist
        self.rank, self.world = rank, world
        env = os.environ
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=max(2 * interval, 5.0)), wait_for_workers=False)
        attempt = f"{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.store = dist.PrefixStore(f"gpt3d/heartbeat/{attempt}/", store)

    @classmethod
    def connect(cls, rank: int, world: int, interval: float) -> Optional[Heartbeats]:
        """None for one process, or where the store cannot be reached (each rank then watches itself only)."""
        if world <= 1 or not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            return None
        try:
            return cls(rank, world, interval)
        except Exception:  # noqa: BLE001 - no store, no heartbeats
            return None

    def beat(self, what: str) -> None:
        self.store.set(str(self.rank), json.dumps({"t": time.time(), "what": what, "where": main_thread_place()}))

    def raise_alarm(self, text: str) -> None:
        self.store.set("alarm", text)

    def alarm(self) -> Optional[str]:
        return self.store.get("alarm").decode() if self.store.check(["alarm"]) else None

    def survey(self, silent_after: float) -> tuple[list[str], str]:
        """(the other ranks silent for over `silent_after` seconds, where the live ones, this one too, are)."""
        silent, places, now = [], {main_thread_place(): [self.rank]}, time.time()
        for r in range(self.world):
            if r == self.rank:
                continue
            if not self.store.check([str(r)]):
                silent.append(f"rank {r} never sent a heartbeat")
                continue
            beat = json.loads(self.store.get(str(r)))
            age = now - beat["t"]
            if age > silent_after:
                silent.append(f"rank {r} sent no heartbeat for {age:.0f} s (stopped, dead or unreachable; last "
                              f"progress: {beat['what']})")
            else:
                places.setdefault(beat["where"], []).append(r)
        by_place = [f"{_ranks(rs)} in {place}" for place, rs in sorted(places.items(), key=lambda kv: len(kv[1]))]
        return silent, "live: " + ", ".join(by_place)


class Watchdog:
    """`progress(what)` after each unit of work, `allow(what, extra_s)` around a slow phase; the thread runs
    while the watchdog is entered as a context manager (outside it both calls only record)."""

    def __init__(self, timeout_s: float, rank: int, world: int, *, first_extra_s: float = 0.0):
        self.timeout_s, self.rank, self.world, self.first_extra_s = timeout_s, rank, world, first_extra_s
        self.interval = min(max(timeout_s / 8, 0.5), 10.0)
        self.heartbeats: Optional[Heartbeats] = None
        self._what = "starting"
        self._extra = self._armed_extra = 0.0
        self._deadline = float("inf")
        self._backstop_armed = -float("inf")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def for_run(cls, timeout_minutes: float, rank: int, world: int, compile: bool) -> Watchdog:
        return cls(timeout_minutes * 60, rank, world, first_extra_s=FIRST_STEP_EXTRA_S[compile])

    # ----- the main thread's side -------------------------------------------------------------------------------
    def __enter__(self) -> Watchdog:
        self.heartbeats = Heartbeats.connect(self.rank, self.world, self.interval)
        self._thread = threading.Thread(target=self._watch, name="gpt3d-watchdog", daemon=True)
        self._arm(0.0)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            faulthandler.cancel_dump_traceback_later()

    def progress(self, what: str, next_extra_s: float = 0.0) -> None:
        """A unit of work finished: the next must finish within the timeout (plus `next_extra_s`, or the
        enclosing phase's extra time)."""
        self._what = what
        self._arm(max(next_extra_s, self._extra))

    @contextlib.contextmanager
    def allow(self, what: str, extra_s: float) -> Iterator[None]:
        """A phase that may take `extra_s` longer than the timeout (and each of its progress steps as well)."""
        previous, self._extra, self._what = self._extra, extra_s, f"{what} (begun)"
        self._arm(extra_s)
        try:
            yield
        finally:
            self._extra, self._what = previous, f"{what} (done)"
            self._arm(previous)

    def _arm(self, extra_s: float) -> None:
        now = time.monotonic()
        self._deadline, self._armed_extra = now + self.timeout_s + extra_s, extra_s
        if self._thread is not None and (now - self._backstop_armed > self.interval or extra_s):
            # re-arming the C timer starts a thread: not at every step (so it may fire up to `interval` late)
            faulthandler.dump_traceback_later(self.timeout_s + extra_s + self.interval + BACKSTOP_S, exit=True,
                                              file=_stderr())
            self._backstop_armed = now

    def report_silent_peers(self) -> Optional[str]:
        """After a failure elsewhere (e.g. a collective's own timeout): the silent peers, if any, as one line
        with where the live ranks are; the alarm is raised so that the other live ranks dump their stacks."""
        silent, live = self._survey()
        if not silent:
            return None
        text = f"rank {self.rank}: " + "; ".join(silent + [live])
        self._raise_alarm(text)
        return text

    # ----- the thread ---------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """A heartbeat at once, then every `interval`, checking the alarm and this rank's deadline."""
        while True:
            hb = self.heartbeats
            if hb is not None:
                try:
                    hb.beat(self._what)
                    alarm = hb.alarm()
                except Exception:  # noqa: BLE001 - the store is gone (the job is ending): watch on alone
                    alarm = None
                if alarm is not None:
                    self._fire(f"rank {self.rank}: ending with the job after a hang elsewhere ({alarm}); here: last "
                               f"progress {self._what}, in {main_thread_place()}", alarm=False)
            if time.monotonic() > self._deadline and not self._stop.is_set():
                extra = self._armed_extra
                self._fire(f"rank {self.rank}: no progress for {self.timeout_s + extra:.0f} s "
                           f"(--distributed-timeout-minutes {self.timeout_s / 60:g}"
                           f"{f' + {extra:.0f} s allowed for this phase' if extra else ''}); last progress: "
                           f"{self._what}, now in {main_thread_place()}" + "".join(f"; {s}" for s in self._report()),
                           alarm=True)
            if self._stop.wait(min(self.interval, max(self._deadline - time.monotonic(), 0.0))):
                return

    def _survey(self) -> tuple[list[str], str]:
        """The heartbeats' survey (silent ranks, live ranks' places); a silent store counts as a silent peer."""
        if self.heartbeats is None:
            return [], ""
        try:
            return self.heartbeats.survey(self.timeout_s / 2)
        except Exception:  # noqa: BLE001 - the store is unreachable
            return ["the job's store is unreachable (rank 0's host or the launcher may be down)"], ""

    def _report(self) -> list[str]:
        silent, live = self._survey()
        return silent + ([live] if live else [])

    def _raise_alarm(self, text: str) -> None:
        if self.heartbeats is not None:
            try:
                self.heartbeats.raise_alarm(text)
            except Exception:  # noqa: BLE001 - nobody to tell
                pass

    def _fire(self, text: str, alarm: bool) -> None:
        """One error line, every thread's stack, exit: the main thread is stuck, so this thread ends the process."""
        err = HangError(f"{text}; stacks of rank {self.rank}'s threads follow; exiting with status "
                        f"{HangError.exit_code} so the launcher can restart from the last checkpoint")
        if alarm:
            self._raise_alarm(text.split("; ")[0])
        sys.stderr.write(error_line(err) + "\n")   # one write: ranks sharing a stderr never split the line
        sys.stderr.flush()
        _record_for_launcher(err)
        _dump_stacks(self.rank)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(err.exit_code)


def _dump_stacks(rank: int) -> None:
    """Every thread's Python stack in faulthandler's format, each thread's block in one write: the ranks of a
    job share the launcher's stderr, and a pipe keeps a write of up to 4 KiB whole, so two ranks dumping at
    once do not interleave their lines (faulthandler writes a frame at a time)."""
    out = _stderr()
    main = threading.main_thread().ident
    for ident, frame in sys._current_frames().items():
        name = "main thread" if ident == main else f"thread {ident:#x}"
        lines = [f"rank {rank}, {name} (most recent call first):"]
        while frame is not None:
            lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno} in {frame.f_code.co_name}')
            frame = frame.f_back
        try:
            os.write(out.fileno(), ("\n".join(lines) + "\n\n").encode(errors="replace"))
        except (OSError, ValueError):
            return


def _stderr():
    """A stream faulthandler can write to: stderr, or the process' original one where stderr is captured."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__


def _record_for_launcher(err: HangError) -> None:
    """torchrun's error file (what @record writes for an exception): the job's failure summary then shows
    this line and the main thread's stack for this rank."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    frame = sys._current_frames().get(threading.main_thread().ident)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
    data = {"message": {"message": f"{type(err).__name__}: {err}",
                        "extraInfo": {"py_callstack": f"{error_line(err)}\nmain thread:\n{stack}",
                                      "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as fh:
            json.dump(data, fh)
    except OSError:
        pass
