"""Throughput accounting: the FLOPs of one iteration (counted in flops.py), turned into TFLOPs/GPU and MFU for a
measured time.

Two FLOP counts are reported, because papers use both:
  * Megatron-DeepSpeed's `throughput_calculator` formula,
      72 * B * s * l * h^2 * (1 + s/(6h) + V/(16 l h))   (x 4/3 with activation recompute),
    with V the padded vocabulary — the number the seed's logs and the GPT-3/BLOOM reports quote;
  * the PaLM-style 6N + 12*l*h*s per token, N = parameters without position embeddings.
MFU uses the model FLOPs of gpt3d/perf/flops.py (Megatron-LM's current count: GQA, SwiGLU's three matrices,
causal attention as half of s^2; no recompute) over `peak_tflops`, and reports them as `model_flops_per_token`.
"""
from __future__ import annotations

from ..config import ModelConfig
from .flops import megatron_flops_per_iter, model_flops_per_token, palm_flops_per_iter


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
