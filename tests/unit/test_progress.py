"""gpt3d/console/progress.py off a terminal: dated lines with rate and ETA, on the stream given (stderr by default).

The interval and the clock are injected: interval 0 prints at every update, and the clock is a counter the
test advances, so nothing here reads the real clock or depends on timing."""
from __future__ import annotations

import io
import re

from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d.console.progress import Activity, Progress, fmt_duration

DATED = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")


class Clock:
    """A clock that moves only when told."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@fuzz(100)   # nothing written beside the tests
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=20), st.floats(0.5, 100.0))
def test_lines_count_rate_and_eta(steps, seconds_per_step):
    clock, out = Clock(), io.StringIO()
    total = sum(steps)
    times = []
    with Progress("eval", total, "tokens", stream=out, interval=0, clock=clock) as bar:
        for n in steps:
            clock.now += seconds_per_step
            times.append(clock.now)
            bar.update(n)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(steps) + 1 and all(DATED.match(x) for x in lines)
    done = 0
    for line, n, secs in zip(lines, steps, times):
        done += n
        rate = done / secs
        assert f"eval: {done:,}/{total:,} tokens ({100 * done / total:.1f}%)" in line
        assert f"elapsed {fmt_duration(secs)}" in line and f"ETA {fmt_duration((total - done) / rate)}" in line
        assert " tokens/s" in line
    assert "eval: done" in lines[-1] and f"{total:,} tokens in {fmt_duration(times[-1])}" in lines[-1]


def test_the_interval_paces_the_lines_and_quick_work_prints_nothing():
    clock, out = Clock(), io.StringIO()
    bar = Progress("verifying", 100, "MB", stream=out, interval=10, clock=clock)
    for _ in range(25):             # 25 updates over 50 clock seconds: a line at 10, 20, 30, 40 and 50
        clock.now += 2
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and "done" in lines[-1]
    quick = io.StringIO()
    with Progress("verifying", 100, "MB", stream=quick, interval=10, clock=Clock()) as q:
        q.update(100)               # no time passed: no line, and so no closing line either
    assert quick.getvalue() == ""


def test_side_counts_forced_lines_unknown_totals_and_disabled():
    clock, out = Clock(), io.StringIO()
    bar = Progress("preprocess", None, "documents", stream=out, interval=1e9, clock=clock)
    clock.now = 4
    bar.update(100, force=True, MB=2.0, tokens=5000)     # preprocess's --log-interval: a line now
    line = out.getvalue().splitlines()[0]
    assert "preprocess: 100 documents, 25 documents/s, 2 MB (0.5 MB/s), 5,000 tokens (1,250 tokens/s)" in line
    assert "ETA" not in line and "%" not in line         # no total: no percentage, no ETA
    silent = io.StringIO()
    with Progress("x", 10, stream=silent, interval=0, enabled=False) as off:
        off.update(5)
    assert silent.getvalue() == ""


def test_activity_ticks_name_the_work_and_its_time():
    clock, out = Clock(), io.StringIO()
    with Activity("torch.compile: compiling the first step", stream=out, interval=0, clock=clock,
                  thread=False) as work:
        clock.now = 75
        work.tick()
        assert work.elapsed() == 75
    assert re.match(DATED.pattern + r"torch\.compile: compiling the first step: still working, elapsed 0:01:15$",
                    out.getvalue())
