"""The planner's dropout term (gpt3d/plan/timing.py, constants in presets.py): what dropout adds to a step is
its own line, built from the residual sites' mask passes and the fused attention's overhead."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpt3d.plan.layout import layout_of
from gpt3d.plan.presets import ATTN_DROPOUT_OVERHEAD, DROPOUT_HASH_BYTES, DROPOUT_MASK_BYTES, resolve_gpu
from gpt3d.plan.search import predict_layout

from tests.support.curves import tiny_config

H100 = resolve_gpu("h100-80gb")


def _predict(**kw):
    cfg = tiny_config(num_layers=4, hidden_size=2048, num_attention_heads=16, seq_length=2048,   # GPU-bound
                      max_position_embeddings=2048, micro_batch_size=8, global_batch_size=16, bf16=True,
                      compile=True, **kw)
    return predict_layout(cfg, layout_of(cfg, 1), H100, vocab_size=256)


@settings(max_examples=20, deadline=None)
@given(hidden=st.sampled_from([0.0, 0.1, 0.3]), attention=st.sampled_from([0.0, 0.1]),
       recompute=st.sampled_from([None, "selective", "full"]))
def test_dropout_term(hidden, attention, recompute):
    none = _predict(hidden_dropout=0.0, attention_dropout=0.0, recompute_granularity=recompute)
    p = _predict(hidden_dropout=hidden, attention_dropout=attention, recompute_granularity=recompute)
    if hidden == attention == 0.0:
        assert "dropout" not in p.time.parts and p.time.seconds == none.time.seconds
        return
    assert p.time.tokens_per_s < none.time.tokens_per_s
    # residual sites: 2 per layer and the embedding's, each micro-batch, over [b, s, h] elements
    elements = 8 * 2048 * 2048
    rate = H100.calibration.ew_gbps * 1e9
    sites = (2 * 4 + 1) * 2 * elements * (DROPOUT_HASH_BYTES + DROPOUT_MASK_BYTES) / rate if hidden else 0.0
    assert p.time.parts["dropout"] >= sites * (1 - 1e-9)
    assert (p.time.parts["dropout"] > sites * (1 + 1e-9)) is (attention > 0)   # the attention kernels' share
    assert 0 < ATTN_DROPOUT_OVERHEAD < 1
