"""The planner's dropout term (gpt3d/plan/timing.py, constants in presets.py): what dropout adds to a step is
its own line, built from the residual sites' mask passes and the fused attention's per-score cost."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d.plan.layout import layout_of
from gpt3d.plan.presets import (ATTN_DROPOUT_S_PER_SCORE, DROPOUT_HASH_BYTES, DROPOUT_MASK_BYTES, h100_calibration,
                                resolve_gpu)
from gpt3d.plan.search import predict_layout

from tests.support.curves import tiny_config

H100 = resolve_gpu("h100-80gb")


def _predict(**kw):
    shape = {"hidden_size": 2048, "num_attention_heads": 16, "seq_length": 2048, "max_position_embeddings": 2048,
             **kw}   # GPU-bound
    cfg = tiny_config(num_layers=4, micro_batch_size=8, global_batch_size=16, bf16=True, compile=True, **shape)
    return predict_layout(cfg, layout_of(cfg, 1), H100, vocab_size=256)


@fuzz(20)
@given(hidden=st.sampled_from([0.0, 0.1, 0.3]), attention=st.sampled_from([0.0, 0.1]),
       recompute=st.sampled_from([None, "selective", "full"]))
def test_dropout_term(hidden, attention, recompute):
    none = _predict(hidden_dropout=0.0, attention_dropout=0.0, recompute_granularity=recompute)
    p = _predict(hidden_dropout=hidden, attention_dropout=attention, recompute_granularity=recompute)
    if hidden == attention == 0.0:
        assert "dropout" not in p.time.parts and p.time.seconds == none.time.seconds
        return
    assert p.time.tokens_per_s < none.time.tokens_per_s
    # residual sites: 2 per layer and the embedding's, 2 micro-batches, over [b, s, h] elements
    elements = 8 * 2048 * 2048
    rate = H100.calibration.ew_gbps * 1e9
    sites = (2 * 4 + 1) * 2 * elements * (DROPOUT_HASH_BYTES + DROPOUT_MASK_BYTES) / rate if hidden else 0.0
    # attention: every score (b x heads x s x s) of 4 layers, 2 micro-batches, at the H100's measured cost
    scores = 2 * 4 * 8 * 16 * 2048 * 2048
    attn = scores * ATTN_DROPOUT_S_PER_SCORE * h100_calibration().attn_tflops / H100.calibration.attn_tflops \
        if attention else 0.0
    assert p.time.parts["dropout"] == pytest.approx(sites + attn, rel=1e-9)


def test_attention_dropout_costs_the_same_per_score_whatever_the_head_size():
    """The measured cost is per score: heads x s^2 fixed, head size 64 or 128 adds the same time (attention's
    own time differs), and twice the sequence costs four times as much."""
    def cost(heads, hidden, seq):
        kw = dict(num_attention_heads=heads, hidden_size=hidden, seq_length=seq, max_position_embeddings=seq)
        return _predict(attention_dropout=0.1, hidden_dropout=0.0, **kw).time.parts["dropout"]
    assert cost(16, 2048, 2048) == pytest.approx(cost(16, 1024, 2048), rel=1e-9)
    assert cost(16, 2048, 2048) == pytest.approx(4 * cost(16, 2048, 1024), rel=1e-9)
    assert cost(32, 2048, 2048) == pytest.approx(2 * cost(16, 2048, 2048), rel=1e-9)


@fuzz(24)
@given(tp=st.sampled_from([1, 2]), kv_heads=st.sampled_from([16, 4]), gpu=st.sampled_from(["h100-80gb", "a100-80gb"]),
       recompute=st.sampled_from([None, "selective", "full"]))
def test_attention_dropout_per_rank_scaled_and_recomputed(tp, kv_heads, gpu, recompute):
    """Each rank pays for its own query heads' scores (TP splits them, GQA's fewer K/V heads do not change the
    count), a GPU with slower attention pays more, and recomputing the attention (selective or full) adds the
    forward's share again."""
    g = resolve_gpu(gpu)

    def pred(attention):
        cfg = tiny_config(num_layers=4, hidden_size=2048, num_attention_heads=16, num_key_value_heads=kv_heads,
                          seq_length=2048, max_position_embeddings=2048, micro_batch_size=8, global_batch_size=16,
                          bf16=True, compile=True, tensor_model_parallel_size=tp, recompute_granularity=recompute,
                          attention_dropout=attention)
        return predict_layout(cfg, layout_of(cfg, tp), g, vocab_size=256).time.parts
    on, off = pred(0.1), pred(0.0)
    total = 2 * 4 * 8 * (16 // tp) * 2048 * 2048 * ATTN_DROPOUT_S_PER_SCORE * \
        h100_calibration().attn_tflops / g.calibration.attn_tflops   # 2 micro-batches, 4 layers, b x heads/tp x s^2
    assert on["dropout"] == pytest.approx(total, rel=1e-9) and "dropout" not in off
    again = on.get("recompute", 0.0) - off.get("recompute", 0.0)
    assert again == pytest.approx(total / 3.5 if recompute else 0.0, rel=1e-9, abs=1e-15)
