"""GPT decoder (GPT-3/Megatron style by default, Llama style by config).

One stage of the pipeline is one `GPTModel` holding some global layer ids;
the first stage also holds the embeddings, the last the final norm, the output
head and the loss. Layers are keyed by their global id, so parameter names (and
checkpoints) do not depend on how the pipeline is cut.

Activation layout is [batch, seq, hidden]; with sequence parallelism the
residual stream between layers is [batch, seq/tp, hidden].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..parallel.cross_entropy import linear_cross_entropy, vocab_parallel_cross_entropy
from ..parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, init_parameters,
                               mark)
from ..parallel.layout import padded_vocab_size
from ..parallel.param_meta import set_meta
from ..parallel.mappings import copy_to_tp, gather_from_sequence
from ..parallel.random import EMBEDDING_SITE, TPRNG, recompute, replicated_dropout, split_dropout
from ..parallel.state import ParallelState
from .attention import KVCache, LayerKV, SelfAttention

# Global names of the parameters with a (padded) vocabulary dimension; checkpoints and HF conversion use them.
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer"      # the untied output head, or the last stage's copy of the tied embedding
VOCAB_PARAMETERS = (EMBEDDING, OUTPUT_LAYER)


def layer_prefix(layer_id: int) -> str:
    """The global name prefix of layer `layer_id`'s parameters (GPTModel keys its layers by global id)."""
    return f"layers.{layer_id}."


def build_norm(cfg: ModelConfig, ps: ParallelState) -> nn.Module:
    if cfg.normalization == "rmsnorm":
        norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=ps.device)
    else:
        norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=ps.device)
    mark(norm.weight, None, ("ones",), sequence_parallel=ps.sp)
    if getattr(norm, "bias", None) is not None:
        mark(norm.bias, None, ("zeros",), sequence_parallel=ps.sp)
    return norm


def residual_dropout(x: torch.Tensor, p: float, training: bool, ps: ParallelState, tp_rng: TPRNG,
                     draw: Optional[torch.Tensor], site, offset: int = 0) -> torch.Tensor:
    """Dropout on the residual stream (parallel/random.py): sequence-parallel shards differ per TP rank, so do
    their masks (default generator); the replicated stream gets the same mask on every TP peer (hash of the
    chunk's `draw` and the dropout site `site + offset`)."""
    if not training or p == 0.0:
        return x
    if ps.sp:
        return split_dropout(x, p)
    return replicated_dropout(x, p, tp_rng.seed, draw, site + offset)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState):
        super().__init__()
        bias, h, f = not cfg.disable_bias_linear, cfg.hidden_size, cfg.ffn_size
        std = cfg.init_method_std
        self.swiglu, self.gelu_approximation = cfg.swiglu, cfg.gelu_approximation
        if self.swiglu:
            self.gate = ColumnParallelLinear(h, f, ps, bias=bias, std=std)
        self.fc1 = ColumnParallelLinear(h, f, ps, bias=bias, std=std)
        self.fc2 = RowParallelLinear(f, h, ps, bias=bias, std=std / (2 * cfg.num_layers) ** 0.5)
        self._fused = None

    def set_fused(self, fused) -> None:
        """`fused(x, [gate.weight, gate.bias,] fc1.weight, fc1.bias, fc2.weight)` runs the MLP's GEMM work in one
        (e.g. FP8, gpt3d/model/fp8_mlp.py); the TP layers keep their communication and fc2's bias (the gate
        and fc1 share fc1's input gather). None: per linear. Clears the linears' gradient-accumulation marks
        (model/grad_accumulation.py sets them, asking the GEMM function that runs them)."""
        object.__setattr__(self, "_fused", fused)   # a plain attribute, never a submodule: names stay the same
        for linear in ((self.gate,) if self.swiglu else ()) + (self.fc1, self.fc2):
            set_meta(linear.weight, fuses_wgrad=False)

    def fused_linears(self) -> tuple[nn.Module, ...]:
        """The linears whose GEMMs the fused function runs (none without one): their own GEMM path is bypassed."""
        if self._fused is None:
            return ()
        return ((self.gate,) if self.swiglu else ()) + (self.fc1, self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            gate = (self.gate.weight, self.gate.bias) if self.swiglu else ()
            y = self._fused(self.fc1.gather_input(x), *gate, self.fc1.weight, self.fc1.bias, self.fc2.weight)
            return self.fc2.reduce_output(y)
        if self.swiglu:
            return self.fc2(F.silu(self.gate(x)) * self.fc1(x))   # [b, s, f/tp] -> [b, s(/tp), h]
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu_approximation))


class TransformerLayer(nn.Module):
    """Pre-LN block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, tp_rng: TPRNG, layer_id: int = 0):
        super().__init__()
        self.ps, self.tp_rng, self.p = ps, tp_rng, cfg.hidden_dropout
        self.input_norm = build_norm(cfg, ps)
        self.attention = SelfAttention(cfg, ps)
        self.post_attention_norm = build_norm(cfg, ps)
        self.mlp = MLP(cfg, ps)
        # this layer's replicated-dropout sites (4 * global id + 0 / 1): a buffer, not a Python int, so one
        # compiled layer body serves every layer without recompiling
        self.register_buffer("dropout_site", torch.tensor(4 * layer_id, dtype=torch.int64, device=ps.device),
                             persistent=False)

    def _dropout(self, x: torch.Tensor, draw: Optional[torch.Tensor], offset: int) -> torch.Tensor:
        return residual_dropout(x, self.p, self.training, self.ps, self.tp_rng, draw, self.dropout_site, offset)

    def forward(self, x: torch.Tensor, kv_cache: Optional[LayerKV] = None,
                draw: Optional[torch.Tensor] = None) -> torch.Tensor:   # [b, s(/tp), h]
        x = x + self._dropout(self.attention(self.input_norm(x), kv_cache), draw, 0)
        return x + self._dropout(self.mlp(self.post_attention_norm(x)), draw, 1)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, padded_vocab: int, tp_rng: TPRNG):
        super().__init__()
        self.ps, self.tp_rng, self.p = ps, tp_rng, cfg.hidden_dropout
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, cfg.hidden_size, ps, std=cfg.init_method_std)
        self.position_embeddings = None
        if cfg.learned_positions:
            self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size, device=ps.device)
            mark(self.position_embeddings.weight, None, ("normal", cfg.init_method_std), sequence_parallel=ps.sp)

    def forward(self, tokens: torch.Tensor, start: int = 0,
                draw: Optional[torch.Tensor] = None) -> torch.Tensor:  # [b, s] -> [b, s(/tp), h]
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            s = tokens.shape[1]
            pos = torch.arange(start, start + s, device=tokens.device)
            if self.ps.sp:
                pos = pos.chunk(self.ps.tp)[self.ps.tp_rank]
            x = x + self.position_embeddings(pos)
        return residual_dropout(x, self.p, self.training, self.ps, self.tp_rng, draw, EMBEDDING_SITE)


class GPTModel(nn.Module):
    """The layers `layer_ids` of a GPT, plus embeddings/head when this is the first/last stage."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, tp_rng: TPRNG, *, vocab_size: int,
                 layer_ids: Optional[list] = None, pre_process: bool = True, post_process: bool = True):
        super().__init__()
        self.cfg, self.ps = cfg, ps
        self.vocab_size = vocab_size
        self.padded_vocab = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, ps.tp)
        self.pre_process, self.post_process = pre_process, post_process
        layer_ids = list(range(cfg.num_layers)) if layer_ids is None else list(layer_ids)
        self.embedding = Embedding(cfg, ps, self.padded_vocab, tp_rng) if pre_process else None
        if pre_process and not cfg.untie_embeddings_and_output_weights:
            set_meta(self.embedding.word_embeddings.weight, shared_embedding=True)   # the output head reuses it
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, ps, tp_rng, i) for i in layer_ids})
        self.recompute_layers = set()
        if cfg.recompute_granularity == "full":
            n = len(layer_ids) if cfg.recompute_num_layers is None else cfg.recompute_num_layers
            self.recompute_layers = {str(i) for i in layer_ids[:n]}
        self.tp_rng = tp_rng
        # does a training forward draw from the replicated-dropout stream (residual dropout without SP)?
        self._replicated_dropout = cfg.hidden_dropout > 0 and not ps.sp
        self.final_norm = build_norm(cfg, ps) if post_process else None
        self.output_layer = None
        if post_process and (cfg.untie_embeddings_and_output_weights or not pre_process):
            w = nn.Parameter(torch.empty(self.padded_vocab // ps.tp, cfg.hidden_size, device=ps.device))
            self.output_layer = mark(w, 0, ("normal", cfg.init_method_std))
            if not cfg.untie_embeddings_and_output_weights:
                set_meta(w, tied_to=EMBEDDING)   # last stage's copy of the first stage's embedding

    def init_weights(self, seed: int) -> None:
        init_parameters(self, seed, self.ps, rows_limit={name: self.vocab_size for name in VOCAB_PARAMETERS})

    def cast_parameters(self, dtype: torch.dtype) -> GPTModel:
        """Parameters only: buffers (the RoPE frequencies) stay fp32, in training and in inference alike."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    def output_weight(self) -> torch.Tensor:
        return self.output_layer if self.output_layer is not None else self.embedding.word_embeddings.weight

    def forward(self, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None,
                hidden: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """tokens/labels: [b, s]. Returns per-token loss [b, s] on the last stage when labels are given,
        logits [b, s, V/tp] without labels, else the hidden state [b, s(/tp), h] for the next stage.
        `kv_cache` (inference, one stage): tokens continue the cached ones, the cache grows by s."""
        start = kv_cache.length if kv_cache is not None else 0
        draw = self.tp_rng.next_draw() if self._replicated_dropout and self.training else None
        x = self.embedding(tokens, start, draw) if self.pre_process else hidden
        for key, layer in self.layers.items():
            if kv_cache is not None:
                x = layer(x, kv_cache.layer(key))
            elif key in self.recompute_layers and self.training:
                x = recompute(layer, x, None, draw)
            else:
                x = layer(x, None, draw)
        if kv_cache is not None:
            kv_cache.length += x.shape[1]
        if not self.post_process:
            return x
        x = self.final_norm(x)
        x = gather_from_sequence(x, self.ps) if self.ps.sp else copy_to_tp(x, self.ps)   # [b, s, h]
        if labels is not None and self.cfg.cross_entropy_loss_fusion:   # logits never materialised
            return linear_cross_entropy(x, self.output_weight(), labels, self.vocab_size, self.ps)
        logits = F.linear(x, self.output_weight())            # [b, s, V/tp]
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels, self.vocab_size, self.ps)


def count_parameters(cfg: ModelConfig, vocab_size: int) -> dict:
    """Full-model parameter counts (layout independent), for FLOPs and for naming models."""
    h, f, L = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.kv_heads
    b = 0 if cfg.disable_bias_linear else 1
    attn = h * (nh + 2 * nkv) * hd + b * (nh + 2 * nkv) * hd + nh * hd * h + b * h
    mlp = (3 if cfg.swiglu else 2) * h * f + b * ((2 if cfg.swiglu else 1) * f + h)
    norm = h * (1 if cfg.normalization == "rmsnorm" else 2)
    layer = attn + mlp + 2 * norm
    emb = vocab_size * h
    pos = cfg.max_positions * h if cfg.learned_positions else 0
    head = emb if cfg.untie_embeddings_and_output_weights else 0
    total = L * layer + emb + pos + norm + head
    return {"total": total, "non_embedding": total - emb - pos - head, "layers": L * layer,
            "embedding": emb, "position": pos}
