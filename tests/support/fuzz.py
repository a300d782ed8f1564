"""The property tests' one set of hypothesis settings: no deadline (a step of a training run is no unit of time),
the same examples on every run, so a failure in CI is reproducible and never a coin toss, and nothing written
beside the tests (no example database). GPT3D_FUZZ_EXPLORE=N runs N times as many examples, drawn at random, to
look for new failures."""
from __future__ import annotations

import os

from hypothesis import settings

EXPLORE = int(os.environ.get("GPT3D_FUZZ_EXPLORE", "0"))


def fuzz(max_examples: int, **extra) -> settings:
    """`@fuzz(n)` in place of `@settings(...)`; `extra`: other settings (e.g. suppress_health_check)."""
    return settings(deadline=None, derandomize=not EXPLORE, database=None,
                    max_examples=max_examples * max(1, EXPLORE), **extra)
