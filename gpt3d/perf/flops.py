"""Every FLOP count gpt3d makes, in one place: model FLOPs (MFU), Megatron-DeepSpeed's and PaLM's reported
counts (throughput.py), and one layer's forward FLOPs on one TP rank (the planner, plan/timing.py).

Model FLOPs of one training token, counted the way Megatron-LM counts them today.

MFU needs the FLOPs the model itself requires, whatever the architecture: the
GPT-3 formula the seed quotes (Megatron-DeepSpeed's `throughput_calculator`,
kept below, `megatron_flops_per_iter`, for its "TFLOPs/GPU" column) assumes 4h GeLU MLPs, full
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

from typing import TYPE_CHECKING

from ..config import ModelConfig
from ..model.gpt import count_parameters

if TYPE_CHECKING:   # the planner's types, for the annotations of layer_flops only
    from ..plan.layout import Candidate
    from ..plan.memory import Shape


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


# ----- the counts reported beside MFU (throughput.py) --------------------------------------------------------------
def megatron_flops_per_iter(cfg: ModelConfig, padded_vocab: int, batch: int, recompute: bool = False) -> float:
    s, L, h = cfg.seq_length, cfg.num_layers, cfg.hidden_size
    factor = 4 if recompute else 3
    return 24 * factor * batch * s * L * h * h * (1.0 + s / (6.0 * h) + padded_vocab / (16.0 * L * h))


def palm_flops_per_iter(cfg: ModelConfig, vocab: int, batch: int) -> float:
    p = count_parameters(cfg, vocab)
    n = p["total"] - p["position"]
    return batch * cfg.seq_length * (6 * n + 12 * cfg.num_layers * cfg.hidden_size * cfg.seq_length)


# ----- the planner's per-layer count (plan/timing.py) ----------------------------------------------------------------
def layer_linears(m: ModelConfig, tp: int) -> list[tuple[int, int]]:
    """(in, out) features of each linear of one transformer layer on one TP rank, as gpt3d/model builds them:
    QKV and the MLP's first linear(s) split their outputs (column-parallel), the attention's projection and
    the MLP's last linear their inputs (row-parallel)."""
    h, hd, nh, nkv, f = m.hidden_size, m.head_dim, m.num_attention_heads, m.kv_heads, m.ffn_size
    first = [(h, f // tp)] * (2 if m.swiglu else 1)   # SwiGLU: gate and up
    return [(h, (nh + 2 * nkv) * hd // tp), (nh * hd // tp, h), *first, (f // tp, h)]


def layer_flops(m: ModelConfig, lay: Candidate, sh: Shape) -> tuple[float, float]:
    """(matmul, attention) forward FLOPs of one layer, one micro-batch, one TP rank (causal: half the scores)."""
    gemm = 2 * sh.tokens * sum(i * o for i, o in layer_linears(m, lay.tp))
    attn = 2 * sh.b * sh.s * sh.s * m.num_attention_heads * m.head_dim / lay.tp
    return gemm, attn
