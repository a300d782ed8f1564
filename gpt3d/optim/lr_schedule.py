"""Learning-rate schedule: linear warm-up, then cosine/linear/constant decay to min-lr.

Megatron lets the schedule run in iterations or in tokens (GPT-3's 375M-token
warm-up, 260B-token decay). Here the unit is whichever the config names: any
*_tokens setting makes the schedule count consumed tokens, else iterations.
"""
from __future__ import annotations

import math

from ..config import SchedulerConfig


class LRSchedule:
    def __init__(self, cfg: SchedulerConfig, *, train_iters: int, tokens_per_iter: int):
        self.cfg, self.tokens_per_iter = cfg, tokens_per_iter
        self.by_tokens = cfg.lr_decay_tokens is not None or cfg.lr_warmup_tokens is not None
        if self.by_tokens:
            self.decay = cfg.lr_decay_tokens or (cfg.lr_decay_iters or train_iters) * tokens_per_iter
            self.warmup = cfg.lr_warmup_tokens if cfg.lr_warmup_tokens is not None else \
                cfg.lr_warmup_iters * tokens_per_iter
        else:
            self.decay = cfg.lr_decay_iters or train_iters
            self.warmup = cfg.lr_warmup_iters
        if cfg.lr_warmup_fraction is not None:
            self.warmup = int(cfg.lr_warmup_fraction * self.decay)

    def warmup_beyond(self, last_iteration: int) -> str | None:
        """A warning when the warm-up does not end by the run's last step (`last_iteration`, counted from 1),
        naming the learning rate that step reaches; None otherwise. A warning, not a refusal: a short trial of
        a long run's settings (a seed config's 3B-token warm-up for 20 iterations) is a fair thing to do."""
        if self.warmup <= 0 or self.cfg.lr <= 0:
            return None
        unit = "tokens" if self.by_tokens else "iterations"
        run_end = last_iteration * self.tokens_per_iter if self.by_tokens else last_iteration
        if self.warmup <= run_end:
            return None
        step = (last_iteration - 1) * (self.tokens_per_iter if self.by_tokens else 1)
        last = self.lr(last_iteration - 1, step)
        return (f"the learning-rate warm-up ({self.warmup:,} {unit}) is longer than the run ({run_end:,} {unit}"
                f"{f', {last_iteration:,} iterations' if self.by_tokens else ''}): its last step trains at lr "
                f"{last:.3g}, {last / self.cfg.lr:.1%} of --lr {self.cfg.lr:g} (shorten the warm-up or train longer)")

    def lr(self, iteration: int, tokens: int) -> float:
        """Learning rate for the step that follows `iteration` steps / `tokens` consumed tokens."""
        c = self.cfg
        step = tokens if self.by_tokens else iteration
        if self.warmup > 0 and step < self.warmup:
            # warm-up counts the step being taken, so the first step's learning rate is not zero
            return c.lr * min(1.0, (step + (self.tokens_per_iter if self.by_tokens else 1)) / self.warmup)
        if c.lr_decay_style == "constant" or self.decay <= self.warmup:
            return c.lr
        frac = min(1.0, (step - self.warmup) / (self.decay - self.warmup))
        if c.lr_decay_style == "linear":
            coeff = 1.0 - frac
        else:
            coeff = 0.5 * (math.cos(math.pi * frac) + 1.0)
        return c.min_lr + coeff * (c.lr - c.min_lr)
