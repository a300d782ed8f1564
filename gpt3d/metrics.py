"""Throughput accounting and metric sinks (console, JSON lines, TensorBoard).

Two FLOP counts are reported, because papers use both:
  * Megatron-DeepSpeed's `throughput_calculator` formula,
      72 * B * s * l * h^2 * (1 + s/(6h) + V/(16 l h))   (x 4/3 with activation recompute),
    with V the padded vocabulary — the number the seed's logs and the GPT-3/BLOOM reports quote;
  * the PaLM-style 6N + 12*l*h*s per token, N = parameters without position embeddings.
MFU uses the model FLOPs of gpt3d/flops.py (Megatron-LM's current count: GQA, SwiGLU's three matrices,
causal attention as half of s^2; no recompute) over `peak_tflops`, and reports them as `model_flops_per_token`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

from .config import ModelConfig
from .flops import model_flops_per_token
from .model.gpt import count_parameters


def megatron_flops_per_iter(cfg: ModelConfig, padded_vocab: int, batch: int, recompute: bool = False) -> float:
    s, l, h = cfg.seq_length, cfg.num_layers, cfg.hidden_size
    factor = 4 if recompute else 3
    return 24 * factor * batch * s * l * h * h * (1.0 + s / (6.0 * h) + padded_vocab / (16.0 * l * h))


def palm_flops_per_iter(cfg: ModelConfig, vocab: int, batch: int) -> float:
    p = count_parameters(cfg, vocab)
    n = p["total"] - p["position"]
    return batch * cfg.seq_length * (6 * n + 12 * cfg.num_layers * cfg.hidden_size * cfg.seq_length)


class Throughput:
    """Per-iteration FLOPs of a config, turned into TFLOPs/GPU and MFU for a measured time."""

    def __init__(self, cfg: ModelConfig, vocab: int, padded_vocab: int, global_batch: int, world_size: int,
                 peak_tflops: float):
        recompute = cfg.recompute_granularity is not None
        self.tokens = global_batch * cfg.seq_length
        self.megatron = megatron_flops_per_iter(cfg, padded_vocab, global_batch, recompute)
        self.model_per_token = model_flops_per_token(cfg, padded_vocab)
        self.model = self.model_per_token * self.tokens
        self.palm = palm_flops_per_iter(cfg, vocab, global_batch)
        self.world, self.peak = world_size, peak_tflops

    def report(self, seconds_per_iter: float) -> dict:
        t = max(seconds_per_iter, 1e-12) * self.world * 1e12
        return {"tokens_per_s": self.tokens / max(seconds_per_iter, 1e-12),
                "tflops_per_gpu": self.megatron / t, "tflops_per_gpu_6n": self.palm / t,
                "mfu": self.model / t / self.peak, "model_flops_per_token": self.model_per_token}


def fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricsLogger:
    """Writes only on the logging rank; the others get a no-op logger."""

    def __init__(self, enabled: bool, log_file: Optional[str], tensorboard_dir: Optional[str]):
        self.enabled = enabled
        self.fh = None
        self.tb = None
        if not enabled:
            return
        if log_file:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
            self.fh = open(log_file, "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(tensorboard_dir)

    def console(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def record(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.fh:
            self.fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        if self.tb:
            step = row.get("tokens", row.get("iteration", 0))
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("iteration", "tokens"):
                    self.tb.add_scalar(k, v, row.get("iteration", 0))
            if "loss" in row:
                self.tb.add_scalar("loss_vs_tokens", row["loss"], step)

    def close(self) -> None:
        if self.fh:
            self.fh.close()
        if self.tb:
            self.tb.close()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return dt


def warn(msg: str) -> None:
    print(f"gpt3d: warning: {msg}", file=sys.stderr, flush=True)
