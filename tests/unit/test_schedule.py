"""Learning-rate schedule: warm-up, decay shapes, and iteration vs token units agreeing."""
from __future__ import annotations

import math

import pytest

from gpt3d.config import SchedulerConfig
from gpt3d.optim.lr_schedule import LRSchedule

TOK = 100   # tokens per iteration


def _curve(cfg: SchedulerConfig, iters: int = 120) -> list[float]:
    s = LRSchedule(cfg, train_iters=100, tokens_per_iter=TOK)
    return [s.lr(i, i * TOK) for i in range(iters)]


def test_cosine_warmup_then_decay_to_min():
    lr = _curve(SchedulerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_style="cosine"))
    assert lr[0] < lr[5] < lr[9] <= 1.0 and lr[10] == pytest.approx(1.0, abs=0.02)
    assert all(a >= b - 1e-12 for a, b in zip(lr[10:100], lr[11:101]))   # non-increasing after warm-up
    assert lr[100] == pytest.approx(0.1) and lr[119] == pytest.approx(0.1)
    mid = 10 + (100 - 10) // 2
    assert lr[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=0.02)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_token_units_equal_iteration_units(style):
    by_iters = _curve(SchedulerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_iters=80,
                                      lr_decay_style=style))
    by_tokens = _curve(SchedulerConfig(lr=1.0, min_lr=0.1, lr_warmup_tokens=10 * TOK, lr_decay_tokens=80 * TOK,
                                       lr_decay_style=style))
    assert by_iters == pytest.approx(by_tokens)


def test_decay_iters_kept_with_token_warmup():
    """--lr-decay-iters with a token warm-up: the decay still ends after lr-decay-iters iterations."""
    lr = _curve(SchedulerConfig(lr=1.0, min_lr=0.0, lr_warmup_tokens=10 * TOK, lr_decay_iters=50))
    assert lr[50] == pytest.approx(0.0, abs=1e-9) and lr[30] > 0.0


def test_warmup_never_exceeds_peak():
    lr = _curve(SchedulerConfig(lr=1.0, min_lr=0.0, lr_warmup_tokens=150, lr_decay_tokens=10_000))
    assert lr[0] > 0.0 and max(lr) <= 1.0
