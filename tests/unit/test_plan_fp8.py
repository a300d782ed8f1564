"""The planner's FP8 term (gpt3d/plan/timing.py; constants in presets.py): with --fp8 (tensorwise) the linears
that enable_fp8 switches run at FP8_GEMM_SPEEDUP times the bf16 rate, and their casts (input, weight, output
gradient) are a line of their own; the memory stays bf16's and says so."""
from __future__ import annotations

import types
from typing import Optional

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d.errors import ConfigError
from gpt3d.model.fp8 import Float8Matmul, enable_fp8
from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.layers import ColumnParallelLinear, RowParallelLinear
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState
from gpt3d.plan.layout import layout_of
from gpt3d.plan.presets import FP8_CAST_BYTES, FP8_GEMM_SPEEDUP, GIB, gpu_for_device, resolve_gpu
from gpt3d.plan.search import predict_layout

from tests.support.curves import tiny_config

H100 = resolve_gpu("h100-80gb")
MBS, SEQ, LAYERS, MICRO = 2, 128, 4, 2


def _cfg(fp8: bool, recipe: str = "tensorwise", micro: int = MICRO, **shape):
    """bf16 without the GeLU epilogues (--no-gemm-tuning: FP8 runs have none, test_plan_gelu_epilogues.py models
    them), so that the difference is the FP8 term alone."""
    return tiny_config(num_layers=LAYERS, micro_batch_size=MBS, global_batch_size=MBS * micro, seq_length=SEQ,
                       max_position_embeddings=SEQ, bf16=True, compile=True, fp8=fp8, fp8_recipe=recipe,
                       gemm_tuning=False, **shape)


def _predict(cfg, gpu=H100):
    return predict_layout(cfg, layout_of(cfg, 1), gpu, vocab_size=256)


def _fp8_linears(cfg, ps: Optional[ParallelState] = None) -> list[tuple[int, int]]:
    """(in, out) features of the linears enable_fp8 switches in one layer of the model gpt3d builds (on the
    rank `ps` describes; default one process, TP 1)."""
    ps = ps or ParallelState()
    m = GPTModel(cfg.model, ps, seed_everything(1, ps), vocab_size=256, layer_ids=[0])
    enable_fp8(m, "tensorwise", ps.device, emulate=True)
    return [(x.weight.shape[1], x.weight.shape[0]) for x in m.modules()
            if isinstance(x, (ColumnParallelLinear, RowParallelLinear)) and isinstance(x._matmul, Float8Matmul)]


@fuzz(16)
@given(hidden=st.sampled_from([32, 40, 64]), heads=st.sampled_from([2, 4]), gqa=st.booleans(),
       ffn=st.sampled_from([None, 96, 88]), swiglu=st.booleans(), recompute=st.sampled_from([None, "full"]),
       micro=st.sampled_from([1, MICRO, 5]))
def test_fp8_term_counts_the_linears_the_model_switches(hidden, heads, gqa, ffn, swiglu, recompute, micro):
    """Against the model itself: the casts are every switched linear's input and output gradient at
    FP8_CAST_BYTES per element (the input again in a full recompute's forward) and its weight once a step where
    the step holds the weights' casts (model/fp8_weights.py: several micro-batches or full recompute), else once
    a micro-batch; the layers' GEMM time drops by those linears' share over FP8_GEMM_SPEEDUP; a model with no
    linear FP8 can run is predicted as bf16 exactly."""
    shape = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=1 if gqa else heads,
                 ffn_hidden_size=ffn, swiglu=swiglu, recompute_granularity=recompute, micro=micro)
    bf16, fp8 = _predict(_cfg(False, **shape)), _predict(_cfg(True, **shape))
    linears = _fp8_linears(_cfg(True, **shape))
    if not linears:
        assert "FP8 casts" not in fp8.time.parts and fp8.time.seconds == bf16.time.seconds
        return
    tokens, n = MBS * SEQ, LAYERS * micro
    cal = H100.calibration
    per_element = FP8_CAST_BYTES / (cal.ew_gbps * 1e9)
    held = micro > 1 or recompute == "full"
    inputs = n * sum(tokens * i for i, o in linears) * per_element                      # cast seconds
    weights = (LAYERS if held else n) * sum(i * o for i, o in linears) * per_element
    forward = inputs + weights
    backward = n * sum(tokens * o for _, o in linears) * per_element
    assert fp8.time.parts["FP8 casts"] == pytest.approx(forward + backward, rel=1e-9)
    saved = n * sum(2 * tokens * i * o for i, o in linears) * (1 - 1 / FP8_GEMM_SPEEDUP) / (cal.gemm_tflops * 1e12)
    layers = bf16.time.parts["layers (compute)"] - fp8.time.parts["layers (compute)"]
    assert layers == pytest.approx(3 * saved, rel=1e-9)          # forward and the backward's two GEMMs
    again = fp8.time.parts.get("recompute", 0.0) - bf16.time.parts.get("recompute", 0.0)
    assert again == pytest.approx((inputs if held else forward) - saved if recompute == "full" else 0.0,
                                  rel=1e-9, abs=1e-15)
    # memory: bf16's with the per-layer graphs FP8 compiles to (model/build.compile_granularity), and said
    per_layer = _predict(_cfg(False, compile_granularity="layer", **shape))
    assert fp8.peak_bytes == per_layer.peak_bytes and fp8.notes and not bf16.notes


def test_rowwise_recipes_are_predicted_as_bf16_and_say_so():
    shape = dict(hidden_size=64, num_attention_heads=4)
    bf16 = _predict(_cfg(False, **shape))
    for recipe in ("rowwise", "rowwise_with_gw_hp"):
        p = _predict(_cfg(True, recipe, **shape))
        assert p.time.seconds == bf16.time.seconds and any(f"--fp8-recipe {recipe} is not modelled" in n
                                                          for n in p.notes)


def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_refused():
    cfg = _cfg(True, hidden_size=64, num_attention_heads=4)
    assert _predict(cfg, resolve_gpu("h200")).time.parts["FP8 casts"] > 0
    for gpu in ("a100-80gb", "v100-32gb"):
        with pytest.raises(ConfigError, match="FP8 tensor cores"):
            _predict(cfg, resolve_gpu(gpu))
        assert _predict(_cfg(False, hidden_size=64, num_attention_heads=4), resolve_gpu(gpu)).time.seconds > 0


@fuzz(8)
@given(sp=st.booleans(), swiglu=st.booleans(), gqa=st.booleans())
def test_fp8_casts_per_tp_rank_cover_the_whole_sequence(sp, swiglu, gqa):
    """At TP 2 each rank casts its own linears' shards, but over every token of the micro-batch even with
    sequence parallelism: a column-parallel linear gathers its input first, a row-parallel one's output
    gradient arrives whole."""
    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2 if gqa else 4, swiglu=swiglu,
                 tensor_model_parallel_size=2, sequence_parallel=sp)
    cfg = _cfg(True, **shape)
    p = predict_layout(cfg, layout_of(cfg, 2), H100, vocab_size=256)
    linears = _fp8_linears(cfg, ParallelState.tp_rank_view(2, sequence_parallel=sp))
    tokens = MBS * SEQ
    # MICRO micro-batches: each weight cast once a step (model/fp8_weights.py)
    elements = LAYERS * sum(MICRO * (tokens * i + tokens * o) + i * o for i, o in linears)
    assert linears and p.time.parts["FP8 casts"] == pytest.approx(
        elements * FP8_CAST_BYTES / (H100.calibration.ew_gbps * 1e9), rel=1e-9)


@pytest.mark.parametrize("name, gib, cc, fp8", [("NVIDIA H100 80GB HBM3", 79.2, (9, 0), True),
                                                ("NVIDIA A100-SXM4-80GB", 79.2, (8, 0), False),
                                                ("NVIDIA A10", 22.0, (8, 6), False),       # no preset: H100-like
                                                ("NVIDIA L40S", 44.5, (8, 9), True)])
def test_the_run_gpu_has_fp8_as_its_device_does(monkeypatch, name, gib, cc, fp8):
    """gpt3d train predicts for the GPU it runs on: a device that resembles no preset borrows the H100's
    figures, but FP8 follows the device's own compute capability, as enable_fp8's check does."""
    props = types.SimpleNamespace(name=name, total_memory=gib * GIB, major=cc[0], minor=cc[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert gpu_for_device(0).fp8 is fp8


@fuzz(12)
@given(layers=st.sampled_from([4, 16]), dropout=st.booleans(), fp8=st.booleans(),
       granularity=st.sampled_from(["auto", "chunk", "layer"]))
def test_memory_follows_the_graphs_training_compiles(layers, dropout, fp8, granularity):
    """The memory model's compiled-graph terms follow model/build.compile_granularity, the rule training compiles
    by (--compile-granularity; auto: per layer with FP8, or with dropout from 16 layers): a prediction equals the
    one for the granularity that rule picks, and per-layer graphs hold the MLP backward's workspace a whole-chunk
    graph does not."""
    from gpt3d.model.build import compile_granularity

    def peak(g: str) -> float:
        cfg = tiny_config(num_layers=layers, micro_batch_size=MBS, global_batch_size=MBS, seq_length=SEQ,
                          max_position_embeddings=SEQ, bf16=True, compile=True, fp8=fp8, gemm_tuning=False,
                          hidden_dropout=0.1 if dropout else 0.0, attention_dropout=0.0, compile_granularity=g)
        return _predict(cfg).peak_bytes
    picked = compile_granularity(granularity, 1, 1, layers, dropout, fp8)
    assert peak(granularity) == peak(picked)
    assert peak("layer") > peak("chunk")
