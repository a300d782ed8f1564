"""Dynamic loss scaling for fp16 (Megatron's rules: hysteresis before backing off), decided on the device.

Only fp16 needs it; bf16 and fp32 run with `scaler = None`. The scale, the count
of good steps and the hysteresis left are device tensors updated with `where`,
so a step never waits for the host: the AdamW step (optim/adamw.py) already skips a step from
the same `found_inf` flag, and the host reads the scale only when it logs or
saves (a per-step `.item()` cost fp16 a quarter of its speed, benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch

from ..config import PrecisionConfig


class DynamicLossScaler:
    def __init__(self, cfg: PrecisionConfig, device: torch.device):
        self.dynamic = cfg.loss_scale is None
        self.scale = torch.tensor([cfg.loss_scale or cfg.initial_loss_scale], dtype=torch.float32, device=device)
        self.min_scale, self.window, self.hysteresis = cfg.min_loss_scale, cfg.loss_scale_window, cfg.hysteresis
        self.good_steps = torch.zeros(1, dtype=torch.int64, device=device)
        self.hysteresis_left = torch.full((1,), cfg.hysteresis, dtype=torch.int64, device=device)

    def update(self, found_inf: torch.Tensor) -> torch.Tensor:
        """Advance the scale after a step; returns whether the step was skipped, as a device bool [1]."""
        overflow = found_inf.reshape(1) > 0
        if not self.dynamic:
            return overflow
        self.good_steps = torch.where(overflow, torch.zeros_like(self.good_steps), self.good_steps + 1)
        self.hysteresis_left = torch.where(overflow, self.hysteresis_left - 1, self.hysteresis_left)
        back_off = overflow & (self.hysteresis_left <= 0)
        grow = ~overflow & (self.good_steps % self.window == 0)
        scale = torch.where(back_off, torch.clamp(self.scale / 2.0, min=self.min_scale), self.scale)
        self.scale = torch.where(grow, scale * 2.0, scale)
        self.hysteresis_left = torch.where(grow, torch.full_like(self.hysteresis_left, self.hysteresis),
                                           self.hysteresis_left)
        return overflow

    def state_dict(self) -> dict:
        return {"scale": float(self.scale.item()), "good_steps": int(self.good_steps.item()),
                "hysteresis_left": int(self.hysteresis_left.item())}

    def load_state_dict(self, d: dict) -> None:
        self.scale.fill_(d["scale"])
        self.good_steps.fill_(d["good_steps"])
        self.hysteresis_left.fill_(d["hysteresis_left"])
