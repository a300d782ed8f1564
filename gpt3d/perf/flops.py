"""Model FLOPs of one training token, counted the way Megatron-LM counts them today.

MFU needs the FLOPs the model itself requires, whatever the architecture: the
GPT-3 formula the seed quotes (Megatron-DeepSpeed's `throughput_calculator`,
kept in metrics.py for its "TFLOPs/GPU" column) assumes 4h GeLU MLPs, full
multi-head attention, a full s^2 score matrix and a 4.5*h*V logits term, so it
under-counts SwiGLU (three matrices), over-counts GQA (fewer key/value
projections) and causal attention. This module follows Megatron-LM's current
`num_floating_point_operations` (dense transformer branch):

  per token = 3 (forward + two backward GEMMs) * 2 (multiply-add) * (
      L * h * f * (3 if SwiGLU else 2)                      MLP
    + L * (h * (q + 2 kv) + q * s / 2 * 2 + q * h)          QKV, causal QK^T and AV (half the s^2), projection
    + h * V_padded)                                          logits (tied or untied: one GEMM either way)

with q = heads * head_dim, kv = kv_heads * head_dim. Activation recompute is
not counted (these are model FLOPs); biases, norms and softmax are not GEMMs.
"""
from __future__ import annotations

from ..config import ModelConfig


def model_flops_per_token(cfg: ModelConfig, padded_vocab: int) -> float:
    h, f, L, s = cfg.hidden_size, cfg.ffn_size, cfg.num_layers, cfg.seq_length
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.kv_heads * cfg.head_dim
    mlp = h * f * (3 if cfg.swiglu else 2)
    attention = h * (q + 2 * kv) + q * s + q * h    # q * s/2 (causal) * 2 (scores and values)
    return 3 * 2 * (L * (mlp + attention) + h * padded_vocab)


def model_flops_per_iter(cfg: ModelConfig, padded_vocab: int, batch: int) -> float:
    """FLOPs of `batch` sequences of cfg.seq_length tokens (forward and backward)."""
    return batch * cfg.seq_length * model_flops_per_token(cfg, padded_vocab)
