"""Progress of slow work, the same way everywhere: a tqdm bar on a terminal, a dated line every ~10 s otherwise.

Anything that can take more than a few seconds (preprocess, index building, vocabulary checks, eval, generate,
export-hf/import-hf, checkpoint verification, compilation) reports through here, so a user never stares at a
silent command and every command reads the same. Progress always goes to stderr: stdout carries the commands'
results (`--json` lines, generated text), which progress must never break.

    with Progress("eval", total=n_tokens, unit="tokens") as bar:
        for batch in ...:
            bar.update(len(batch))

On a terminal (stderr is a tty) it is a tqdm bar, shown only once the work has taken `TTY_DELAY` seconds.
Otherwise (a log file, a pipe, a batch job) it is a line every `interval` seconds,
`[2026-12-05 16:50:01] eval: 120,000/254,617 tokens (47.1%), 1,234 tokens/s, elapsed 0:01:37, ETA 0:01:49`,
and, if any was printed, a last line with the totals. `interval` defaults to 10 s, or to the
GPT3D_PROGRESS_INTERVAL environment variable (seconds; 0 prints at every update: what tests use, so that no
test depends on the clock). Work without steps to count (compiling) uses `Activity`: the same lines, from
a thread, until it ends.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from typing import Optional, TextIO
from collections.abc import Callable

INTERVAL_ENV = "GPT3D_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0
TTY_DELAY = 2.0      # a terminal bar appears only for work that takes longer than this


def default_interval() -> float:
    """Seconds between progress lines off a terminal: $GPT3D_PROGRESS_INTERVAL, else 10."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def fmt_duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() or abs(x) >= 100 else f"{x:,.1f}"


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts `unit`s of work towards `total` (None: unknown, no percentage or ETA).

    `update(n, **counts)` adds n units and, optionally, side counts shown with their own rates (preprocess:
    `MB=..., tokens=...`). `enabled=False` (ranks other than the one that speaks) makes every call a no-op.
    `clock` and `interval` are injectable, `stream` defaults to stderr."""

    def __init__(self, what: str, total: Optional[float] = None, unit: str = "it", *,
                 stream: Optional[TextIO] = None, interval: Optional[float] = None, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic, bar_format: Optional[str] = None):
        self.what, self.total, self.unit, self.enabled = what, total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = default_interval() if interval is None else interval
        self.clock = clock
        self.n = 0.0
        self.counts: dict = {}
        self.lines = 0
        self.start = self.last = clock()
        self.bar = None
        if enabled and _is_tty(self.stream):
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", file=self.stream, delay=TTY_DELAY,
                            dynamic_ncols=True, leave=False, mininterval=0.5, bar_format=bar_format)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(done=exc_type is None)

    def update(self, n: float = 1, force: bool = False, **counts: float) -> None:
        """Add `n` units (and side counts); off a terminal, print a line when `interval` has passed since the
        last one, or now if `force` (preprocess's --log-interval: a line every N documents)."""
        if not self.enabled:
            return
        self.n += n
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if self.bar is not None:
            if counts:
                self.bar.set_postfix_str(self._side(self.clock() - self.start), refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        if force or now - self.last >= self.interval:
            self.last = now
            self.emit(self.line(now))

    def emit(self, text: str) -> None:
        """One dated line (off a terminal)."""
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        print(f"[{stamp}] {text}", file=self.stream, flush=True)
        self.lines += 1

    def line(self, now: float) -> str:
        """`what: done/total unit (pct), rate, elapsed, ETA` for the state at clock time `now`."""
        secs = now - self.start
        rate = self.n / secs if secs > 0 else None
        if self.total:
            head = f"{_num(self.n)}/{_num(self.total)} {self.unit} ({100 * self.n / self.total:.1f}%)"
        else:
            head = f"{_num(self.n)} {self.unit}"
        parts = [f"{self.what}: {head}"]
        if rate is not None:
            parts.append(f"{_num(rate)} {self.unit}/s")
        side = self._side(secs)
        if side:
            parts.append(side)
        parts.append(f"elapsed {fmt_duration(secs)}")
        if self.total and rate:
            parts.append(f"ETA {fmt_duration(max(self.total - self.n, 0) / rate)}")
        return ", ".join(parts)

    def _side(self, secs: float) -> str:
        return ", ".join(f"{_num(v)} {k}" + (f" ({_num(v / secs)} {k}/s)" if secs > 0 else "")
                         for k, v in self.counts.items())

    def close(self, done: bool = True) -> None:
        """End the bar; off a terminal, a closing line with the totals if any progress line was printed."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif done and self.lines:
            now = self.clock()
            secs = now - self.start
            rate = f", {_num(self.n / secs)} {self.unit}/s" if secs > 0 else ""
            side = self._side(secs)
            self.emit(f"{self.what}: done, {_num(self.n)} {self.unit} in {fmt_duration(secs)}{rate}"
                      + (f", {side}" if side else ""))
        self.enabled = False


class Activity:
    """Work with nothing to count (compiling, building an index): 'still working' lines from a thread.

    Off a terminal, `tick()` prints `what: still working, elapsed H:MM:SS` and a thread calls it every
    `interval` seconds until the block ends; on a terminal a tqdm counter of seconds does the same. Nothing
    is printed for work shorter than one interval. Tests call `tick()` directly (no thread, no clock)."""

    def __init__(self, what: str, *, stream: Optional[TextIO] = None, interval: Optional[float] = None,
                 enabled: bool = True, clock: Callable[[], float] = time.monotonic, thread: bool = True):
        self.progress = Progress(what, None, "s", stream=stream, interval=interval, enabled=enabled, clock=clock,
                                 bar_format="{desc}: still working, elapsed {elapsed}")
        self.what, self.clock, self.enabled = what, clock, enabled
        self._stop = threading.Event()
        self._thread = None
        if enabled and thread:
            pause = max(self.progress.interval, 0.5) if self.progress.bar is None else 1.0
            self._thread = threading.Thread(target=self._run, args=(pause,), daemon=True)
            self._thread.start()

    def _run(self, pause: float) -> None:
        while not self._stop.wait(pause):
            self.tick()

    def elapsed(self) -> float:
        """Seconds since the activity began."""
        return self.clock() - self.progress.start

    def tick(self) -> None:
        if not self.enabled:
            return
        p = self.progress
        secs = self.clock() - p.start
        if p.bar is not None:
            p.bar.update(max(0.0, secs - p.n))
            p.n = secs
        else:
            p.emit(f"{self.what}: still working, elapsed {fmt_duration(secs)}")

    def __enter__(self) -> Activity:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.progress.bar is not None:
            self.progress.bar.close()
            self.progress.bar = None
        self.progress.enabled = False
        self.enabled = False
