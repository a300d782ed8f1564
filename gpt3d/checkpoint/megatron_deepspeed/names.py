"""Megatron-DeepSpeed parameter names and TP-local layouts -> gpt3d's, as element ranges.

A Megatron-DeepSpeed TP shard of a parameter becomes the same TP shard of one or two gpt3d parameters: the
vocabulary-parallel embedding and output layer, column-parallel QKV and dense_h_to_4h (dim 0) and
row-parallel dense and dense_4h_to_h (dim 1) split exactly as gpt3d splits them, and the replicated norms
and biases are the same everywhere. Two shards need their rows rearranged inside the shard:
  * SwiGLU's dense_h_to_4h holds [gate; up] per TP shard (silu of the first half times the second): the
    halves are gpt3d's mlp.gate and mlp.fc1;
  * QKV: Megatron-DeepSpeed up to the FPDT change (6acc370a and before) groups rows per key/value group as
    [q heads of the group, k, v], which is gpt3d's own layout ("grouped"); after it, a shard holds
    [all q | all k | all v] ("blocks"), regrouped here head block by head block.
Everything is expressed as `pieces`: where each element range of the flattened source shard goes in the
flattened gpt3d shard. The weights and every range of the ZeRO partitions (masters, Adam moments) go through
the same function, so they can never disagree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ...errors import CheckpointError
from ...model.gpt import EMBEDDING, OUTPUT_LAYER, layer_prefix

QKV_GROUPED, QKV_BLOCKS = "grouped", "blocks"

LAYER_SUFFIX = {
    "input_layernorm.weight": "input_norm.weight", "input_layernorm.bias": "input_norm.bias",
    "self_attention.query_key_value.weight": "attention.qkv.weight",
    "self_attention.query_key_value.bias": "attention.qkv.bias",
    "self_attention.dense.weight": "attention.proj.weight", "self_attention.dense.bias": "attention.proj.bias",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "post_attention_layernorm.bias": "post_attention_norm.bias",
    "mlp.dense_h_to_4h.weight": "mlp.fc1.weight", "mlp.dense_h_to_4h.bias": "mlp.fc1.bias",
    "mlp.dense_4h_to_h.weight": "mlp.fc2.weight", "mlp.dense_4h_to_h.bias": "mlp.fc2.bias",
}
EMBEDDING_SUFFIX = {"word_embeddings.weight": EMBEDDING,
                    "position_embeddings.weight": "embedding.position_embeddings.weight"}
NORM_SUFFIX = {"weight": "final_norm.weight", "bias": "final_norm.bias"}
IGNORED = re.compile(r".*(rotary_pos_emb\.inv_freq|\.inv_freq)$")   # buffers, recomputed by gpt3d


@dataclass(frozen=True)
class Target:
    """Where one source parameter goes: gpt3d `name` (SwiGLU: `name` is fc1 and `gate` the gate) and how
    its TP-local rows are arranged (`qkv` layout for QKV, else None)."""
    name: str
    gate: Optional[str] = None
    qkv: Optional[str] = None


@dataclass(frozen=True)
class Shapes:
    """What the row rearrangements need: heads, key/value heads and head size per TP shard."""
    heads: int
    kv_heads: int
    head_dim: int
    swiglu: bool
    qkv_layout: str


def _layer_target(i: int, suffix: str, shapes: Shapes) -> Target:
    if suffix not in LAYER_SUFFIX:
        raise KeyError(suffix)
    name = layer_prefix(i) + LAYER_SUFFIX[suffix]
    if shapes.swiglu and suffix.startswith("mlp.dense_h_to_4h."):
        return Target(name, gate=name.replace(".fc1.", ".gate."))
    if suffix.startswith("self_attention.query_key_value."):
        return Target(name, qkv=shapes.qkv_layout)
    return Target(name)


def target(name: str, shapes: Shapes, layers: Optional[dict] = None) -> Optional[Target]:
    """The gpt3d destination of a Megatron-DeepSpeed parameter name, of either engine: without the pipeline
    engine `language_model.encoder.layers.3.mlp...`, with it `5.mlp...` (pipeline layer index 5, whose role
    `layers` gives) or `tied_modules.embed.word_embeddings.weight`. None for buffers gpt3d recomputes;
    CheckpointError for a name gpt3d has no parameter for."""
    if IGNORED.fullmatch(name):
        return None
    try:
        if layers is None:
            rest = name.removeprefix("language_model.")
            if rest.startswith("embedding."):
                return Target(EMBEDDING_SUFFIX[rest.removeprefix("embedding.")])
            if rest == "output_layer.weight":
                return Target(OUTPUT_LAYER)
            if rest.startswith("encoder.final_layernorm."):
                return Target(NORM_SUFFIX[rest.removeprefix("encoder.final_layernorm.")])
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rest)
            if m:
                return _layer_target(int(m.group(1)), m.group(2), shapes)
        else:
            if name.startswith("tied_modules.embed."):
                return Target(EMBEDDING_SUFFIX[name.removeprefix("tied_modules.embed.")])
            m = re.fullmatch(r"(\d+)\.(.+)", name)
            if m:
                role, suffix = layers[int(m.group(1))], m.group(2)
                if role == "embedding":
                    return Target(EMBEDDING_SUFFIX[suffix])
                if role == "final_norm":
                    return Target(NORM_SUFFIX[suffix])
                if role == "output_layer" and suffix == "lm_head.weight":
                    return Target(OUTPUT_LAYER)
                if isinstance(role, tuple):
                    return _layer_target(role[1], suffix, shapes)
    except KeyError:
        pass
    raise CheckpointError(f"Megatron-DeepSpeed parameter {name} has no gpt3d counterpart")


def _qkv_block_map(shapes: Shapes) -> list[int]:
    """dst block of each src block of a [q heads | k heads | v heads] shard in gpt3d's grouped order."""
    nq, nkv = shapes.heads, shapes.kv_heads
    g = nq // nkv
    out = [i // g * (g + 2) + i % g for i in range(nq)]
    out += [j * (g + 2) + g for j in range(nkv)]
    out += [j * (g + 2) + g + 1 for j in range(nkv)]
    return out


def pieces(t: Target, numel: int, lo: int, hi: int, shapes: Shapes) -> list[tuple[str, int, int, int]]:
    """[(gpt3d name, offset in its flattened TP shard, offset in [lo, hi), length)] for the elements
    [lo, hi) of the flattened TP-local source parameter of `numel` elements."""
    if not 0 <= lo <= hi <= numel:
        raise CheckpointError(f"element range [{lo}, {hi}) outside {t.name}'s {numel} elements")
    if t.gate is not None:   # [gate; up] halves of the shard
        half = numel // 2
        out = []
        if lo < half:
            out.append((t.gate, lo, 0, min(hi, half) - lo))
        if hi > half:
            start = max(lo, half)
            out.append((t.name, start - half, start - lo, hi - start))
        return out
    if t.qkv == QKV_BLOCKS:
        blocks = _qkv_block_map(shapes)
        size = numel // len(blocks)     # head_dim rows of the shard (x hidden for the weight)
        out = []
        pos = lo
        while pos < hi:
            b, within = divmod(pos, size)
            n = min(hi, (b + 1) * size) - pos
            out.append((t.name, blocks[b] * size + within, pos - lo, n))
            pos += n
        return out
    return [(t.name, lo, 0, hi - lo)]
