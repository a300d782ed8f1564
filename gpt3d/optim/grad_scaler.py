"""Dynamic loss scaling for fp16 (Megatron's rules: hysteresis before backing off).

Only fp16 needs it; bf16 and fp32 run with `scaler = None`. The update reads one
flag per step from the device, which is the price of fp16's skip logic.
"""
from __future__ import annotations

import torch

from ..config import PrecisionConfig


class DynamicLossScaler:
    def __init__(self, cfg: PrecisionConfig, device: torch.device):
        self.dynamic = cfg.loss_scale is None
        self.scale = torch.tensor([cfg.loss_scale or cfg.initial_loss_scale], dtype=torch.float32, device=device)
        self.min_scale, self.window, self.hysteresis = cfg.min_loss_scale, cfg.loss_scale_window, cfg.hysteresis
        self.good_steps, self.hysteresis_left = 0, cfg.hysteresis

    def update(self, found_inf: torch.Tensor) -> bool:
        """Returns True if this step was skipped (non-finite gradients somewhere)."""
        overflow = bool(found_inf.item())
        if not self.dynamic:
            return overflow
        if overflow:
            self.good_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = torch.clamp(self.scale / 2.0, min=self.min_scale)
        else:
            self.good_steps += 1
            if self.good_steps % self.window == 0:
                self.scale = self.scale * 2.0
                self.hysteresis_left = self.hysteresis
        return overflow

    def state_dict(self) -> dict:
        return {"scale": float(self.scale.item()), "good_steps": self.good_steps,
                "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, d: dict) -> None:
        self.scale.fill_(d["scale"])
        self.good_steps, self.hysteresis_left = d["good_steps"], d["hysteresis_left"]
