"""The compile policy (gpt3d/model/build.py): compiled by default on CUDA only, and regional compilation that
compiles one transformer layer's body once for every layer."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from gpt3d.config import ModelConfig, TrainingConfig
from gpt3d.model.build import compile_chunks, compile_enabled, compile_granularity
from gpt3d.model.fp8 import enable_fp8
from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState

LLAMA = dict(use_rotary_position_embeddings=True, normalization="rmsnorm", swiglu=True, disable_bias_linear=True,
             num_key_value_heads=2)


@pytest.mark.parametrize("given", [None, True, False])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compiled_by_default_on_cuda_only(given, device):
    want = given if given is not None else device == "cuda"
    assert compile_enabled(TrainingConfig(compile=given), torch.device(device)) is want


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1), (1, 2), (2, 4)])
@pytest.mark.parametrize("layers", [1, 12, 15, 16, 24, 96])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_auto_granularity(tp, dp, layers, dropout, fp8):
    """auto: per-layer graphs with TP or DP, with FP8, and for deep chunks with dropout; the whole chunk
    otherwise. An explicit choice is kept whatever the run."""
    ps = ParallelState(tp=tp, dp=dp)
    whole = tp == dp == 1 and not fp8 and not (dropout and layers >= 16)
    assert compile_granularity("auto", ps.tp, ps.dp, layers, dropout, fp8) == ("chunk" if whole else "layer")
    assert compile_granularity("layer", ps.tp, ps.dp, layers, dropout, fp8) == "layer"
    assert compile_granularity("chunk", ps.tp, ps.dp, layers, dropout, fp8) == "chunk"


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("layers", [2, 15, 16])
def test_auto_compiles_what_compile_granularity_says(dropout, layers, fp8):
    """compile_chunks reads the chunk's depth, dropout and FP8 linears: a 16-layer chunk with dropout and any
    FP8 chunk get per-layer graphs (its layers are compiled modules, the chunk is not), every other single-rank
    chunk one graph."""
    cfg = ModelConfig(num_layers=layers, hidden_size=16, num_attention_heads=2, seq_length=8,
                      hidden_dropout=dropout, attention_dropout=dropout)
    ps = ParallelState.single(torch.device("cpu"))
    model = GPTModel(cfg, ps, seed_everything(0, ps), vocab_size=32)
    if fp8:
        enable_fp8(model, "tensorwise", ps.device, emulate=True)
    compile_chunks([model], ps, "auto", backend="eager")
    per_layer = fp8 or (dropout > 0 and layers >= 16)
    assert all(layer._compiled_call_impl is not None for layer in model.layers.values()) is per_layer
    assert (model._compiled_call_impl is not None) is not per_layer


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("recompute", [None, "full", "selective"])
def test_regional_compilation_compiles_one_layer_for_all(arch, recompute):
    """Six layers, two training steps, hidden and attention dropout on: Dynamo compiles one graph, no
    recompile and no graph break (a per-layer Python value, such as the dropout site as an int, would compile
    each layer anew)."""
    cfg = ModelConfig(num_layers=6, hidden_size=32, num_attention_heads=4, seq_length=32, hidden_dropout=0.1,
                      attention_dropout=0.1, recompute_granularity=recompute, **(LLAMA if arch == "llama" else {}))
    ps = ParallelState()
    model = GPTModel(cfg, ps, seed_everything(1, ps), vocab_size=128)
    model.init_weights(1)
    breaks, stats = _per_layer_graphs(model, ps)
    assert breaks == 0
    assert stats["unique_graphs"] == 1, stats


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_regional_compilation_with_fp8_compiles_one_layer_for_all(recipe, arch):
    """With FP8 GEMMs (torchao, emulated on CPU; with tensorwise the MLP as one FP8 function, GeLU or SwiGLU)
    the per-layer graph still serves every layer, without a graph break: compiling an FP8 model costs one
    layer's compilation (the whole-chunk graph took 96-216 s on an H100)."""
    cfg = ModelConfig(num_layers=6, hidden_size=32, num_attention_heads=4, seq_length=32,
                      **(LLAMA if arch == "llama" else {}))
    ps = ParallelState()
    model = GPTModel(cfg, ps, seed_everything(1, ps), vocab_size=128)
    model.init_weights(1)
    model.cast_parameters(torch.bfloat16)
    n = enable_fp8(model, recipe, ps.device, emulate=True, fused_swiglu=True)
    assert n == (5 if arch == "llama" else 4) * cfg.num_layers
    breaks, stats = _per_layer_graphs(model, ps)
    assert breaks == 0
    assert stats["unique_graphs"] == 1, stats


def _per_layer_graphs(model: GPTModel, ps: ParallelState) -> tuple[int, dict]:
    """(graph breaks, Dynamo's stats) of two training steps of `model` compiled per layer (eager backend)."""
    torch._dynamo.reset()
    counters.clear()
    compile_chunks([model], ps, "layer", backend="eager")
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(tokens[:, :-1], tokens[:, 1:]).float().mean().backward()
    stats, breaks = dict(counters["stats"]), sum(counters["graph_break"].values())
    torch._dynamo.reset()
    return breaks, stats
