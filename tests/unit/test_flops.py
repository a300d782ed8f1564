"""Model FLOPs per token (Megatron-LM's count) against hand counts and against the GEMMs the model really runs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz
from torch.utils.flop_counter import FlopCounterMode

from gpt3d.config import ModelConfig
from gpt3d.perf.flops import layer_linears, model_flops_per_iter, model_flops_per_token
from gpt3d.perf.throughput import Throughput
from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.layers import ColumnParallelLinear, RowParallelLinear
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState

from tests.support.curves import tiny_config


def test_llama_shape_by_hand():
    """16L / h 2048 / 32 heads of 64 / 8 KV heads / SwiGLU FFN 8192 / vocab 128256 / seq 2048."""
    cfg = ModelConfig(num_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                      ffn_hidden_size=8192, seq_length=2048, swiglu=True)
    mlp = 3 * 2048 * 8192                                # gate, up, down: 50,331,648
    qkv = 2048 * (2048 + 2 * 512)                        # 8 KV heads x 64 = 512 wide each: 6,291,456
    core = 2048 * 2048 // 2 * 2                          # causal half of s, scores and values: 4,194,304
    proj = 2048 * 2048                                   # 4,194,304
    logits = 2048 * 128256                               # 262,668,288
    hand = 6 * (16 * (mlp + qkv + core + proj) + logits)
    assert hand == 7_817_134_080
    assert model_flops_per_token(cfg, 128256) == hand


def test_gpt3_shape_by_hand():
    """GPT-3 1.3B: 24L / 2048 / 16 heads, 4h GeLU MLP, padded vocab 50304, seq 2048 (full MHA)."""
    cfg = ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048)
    h = 2048
    per_layer = 2 * h * 4 * h + 3 * h * h + h * 2048 + h * h
    assert model_flops_per_token(cfg, 50304) == 6 * (24 * per_layer + h * 50304) == 8_469_872_640
    assert model_flops_per_iter(cfg, 50304, batch=8) == 8 * 2048 * 8_469_872_640


@pytest.mark.parametrize("llama", [False, True])
def test_counted_gemms_equal_the_formula_without_attention_core(llama):
    """Every forward+backward GEMM the model runs (linear layers, logits) is in the count: the formula minus
    its attention-core term (6 * q * s per token per layer) equals the counted matmul FLOPs."""
    extra = dict(num_key_value_heads=2, swiglu=True, ffn_hidden_size=96, use_rotary_position_embeddings=True,
                 normalization="rmsnorm", disable_bias_linear=True, untie_embeddings_and_output_weights=True) \
        if llama else {}
    cfg = tiny_config(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=250, **extra)
    ps = ParallelState()
    model = GPTModel(cfg.model, ps, seed_everything(1, ps), vocab_size=250)
    b, s = 3, 32
    tokens = torch.randint(0, 250, (b, s))
    with FlopCounterMode(display=False) as counter:
        model(tokens, tokens).mean().backward()
    counts = counter.get_flop_counts()["Global"]
    gemm = sum(n for op, n in counts.items() if str(op) in ("aten.mm", "aten.addmm", "aten.bmm"))
    q = cfg.model.num_attention_heads * cfg.model.head_dim
    core = 6 * q * s * cfg.model.num_layers * b * s
    assert gemm == model_flops_per_iter(cfg.model, model.padded_vocab, b) - core


def test_throughput_reports_model_flops_and_mfu():
    cfg = ModelConfig(num_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                      ffn_hidden_size=8192, seq_length=2048, swiglu=True)
    tp = Throughput(cfg, 128000, 128256, global_batch=4, world_size=2, peak_tflops=1000.0)
    row = tp.report(seconds_per_iter=0.5)
    assert row["model_flops_per_token"] == 7_817_134_080
    assert row["tokens_per_s"] == 4 * 2048 / 0.5
    assert row["mfu"] == pytest.approx(4 * 2048 * 7_817_134_080 / (0.5 * 2 * 1000e12))


@fuzz(20)
@given(tp=st.sampled_from([1, 2, 4]), sp=st.booleans(), heads=st.sampled_from([4, 8]), gqa=st.booleans(),
       swiglu=st.booleans(), ffn=st.sampled_from([None, 96]))
def test_layer_linears_are_the_linears_each_tp_rank_builds(tp, sp, heads, gqa, swiglu, ffn):
    """The planner's per-layer GEMM count (layer_flops sums layer_linears) holds the (in, out) features of the
    linears one TP rank of gpt3d's model really has, whatever the TP size, GQA or SwiGLU."""
    cfg = tiny_config(hidden_size=64, num_attention_heads=heads, num_key_value_heads=4 if gqa else heads,
                      ffn_hidden_size=ffn, swiglu=swiglu).model
    ps = ParallelState.tp_rank_view(tp, sequence_parallel=sp and tp > 1)
    layer = GPTModel(cfg, ps, seed_everything(1, ps), vocab_size=256, layer_ids=[0]).layers["0"]
    built = [(x.weight.shape[1], x.weight.shape[0]) for x in layer.modules()
             if isinstance(x, (ColumnParallelLinear, RowParallelLinear))]
    assert sorted(built) == sorted(layer_linears(cfg, tp)) and len(built) == (5 if swiglu else 4)


@pytest.mark.parametrize("name,memory_gib", [("NVIDIA H100 80GB HBM3", 79.2), ("NVIDIA A100-SXM4-80GB", 79.2),
                                             ("NVIDIA A100-SXM4-40GB", 39.4), ("Tesla V100-SXM2-32GB", 31.7),
                                             ("NVIDIA H200", 139.8), ("Some Future GPU", 200.0)])
def test_mfu_is_against_the_gpus_own_peak_unless_given(monkeypatch, name, memory_gib):
    """MFU's denominator: --peak-tflops where given; else the device's bf16 dense peak as the planner's presets
    know it (an A100's MFU was reported against an H100's 989), the H100's for a GPU they do not know and the CPU."""
    import types
    from gpt3d.plan.presets import mfu_peak_tflops as peak_tflops
    from gpt3d.plan.presets import ALIASES, PRESETS
    props = types.SimpleNamespace(name=name, total_memory=memory_gib * 2 ** 30, major=8, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    want = next((p.tflops for key, p in PRESETS.items() if key.split("-")[0] in name.lower()
                 and abs(p.memory_gib - memory_gib) < 0.1 * p.memory_gib), PRESETS[ALIASES["h100"]].tflops)
    assert peak_tflops(None, torch.device("cuda")) == want
    assert want == {"H100": 989.0, "A100": 312.0, "V100": 125.0, "H200": 989.0}.get(name.split()[1][:4], 989.0)
    assert peak_tflops(123.0, torch.device("cuda")) == 123.0
    assert peak_tflops(None, torch.device("cpu")) == 989.0
