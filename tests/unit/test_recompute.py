"""Activation recompute: fewer bytes kept for backward (measured), identical gradients."""
from __future__ import annotations

import pytest
import torch

from gpt3d.config import ModelConfig
from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState


def _model(granularity, hidden_dropout=0.1, attention_dropout=0.1, num_layers=4, vocab_size=512, **extra):
    cfg = ModelConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4, seq_length=128,
                      hidden_dropout=hidden_dropout, attention_dropout=attention_dropout,
                      recompute_granularity=granularity, **extra)
    ps = ParallelState()
    model = GPTModel(cfg, ps, seed_everything(3, ps), vocab_size=vocab_size)
    model.init_weights(3)
    return model


def _run(granularity, hidden_dropout=0.1, attention_dropout=0.1):
    model = _model(granularity, hidden_dropout, attention_dropout)
    tokens = torch.randint(0, 512, (4, 129), generator=torch.Generator().manual_seed(0))
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(11)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    return saved[0], float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


# (hidden, attention) dropout: attention dropout draws from the default generator inside SDPA (which torch's
# checkpoint restores before recomputing), residual dropout from the counter-based hash (a function of the
# region's inputs)
@pytest.mark.parametrize("dropout", [(0.1, 0.1), (0.1, 0.0)], ids=["attention+hidden", "hidden"])
@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_saves_memory_keeps_gradients(granularity, dropout):
    base_bytes, base_loss, base_grads = _run(None, *dropout)
    bytes_, loss, grads = _run(granularity, *dropout)
    # selective frees little where CPU attention keeps only its log-sum-exp (no attention dropout)
    assert bytes_ < base_bytes * (0.5 if granularity == "full" else 0.95 if dropout[1] else 0.99), (bytes_, base_bytes)
    assert loss == base_loss
    for n, g in grads.items():   # dropout masks are replayed exactly, so gradients are identical
        assert torch.allclose(g, base_grads[n], atol=1e-6, rtol=1e-5), n


def _graph_breaks(model, tokens) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(tokens[:, :-1], tokens[:, 1:]).graph_break_count


LLAMA = dict(use_rotary_position_embeddings=True, normalization="rmsnorm", swiglu=True, disable_bias_linear=True,
             num_key_value_heads=2)


def _compiled_grads(granularity, arch, backend: str, **kw) -> dict:
    extra = LLAMA if arch == "llama" else {}
    tokens = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(0))
    model = _model(granularity, 0.1, 0.1, **extra, **kw)
    torch._dynamo.reset()
    model.compile(backend=backend)
    torch.manual_seed(5)
    model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    torch._dynamo.reset()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_compiles_into_the_graph(granularity, arch):
    """With hidden and attention dropout on, a checkpointed region is traced into the compiled graph with no
    graph break at all (they ran unfused and cost an H200 +37% step time at 125M; forking the TP generator's
    state broke the graph at every dropout site), and the compiled recompute replays every dropout mask: the
    gradients of the compiled model without recompute, exactly."""
    tokens = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(0))
    extra = LLAMA if arch == "llama" else {}
    for dropout in ((0.0, 0.0), (0.1, 0.1)):   # a vocabulary of 500 is padded to 512: the loss masks columns
        assert _graph_breaks(_model(None, *dropout, vocab_size=500, **extra), tokens) == 0
        assert _graph_breaks(_model(granularity, *dropout, vocab_size=500, **extra), tokens) == 0
    # AOTAutograd's partitioner, without Inductor's code generation
    plain, recomputed = (_compiled_grads(g, arch, "aot_eager") for g in (None, granularity))
    for n, g in recomputed.items():
        assert torch.equal(g, plain[n]), n


@pytest.mark.slow
def test_inductor_recompute_replays_dropout():
    """The same through Inductor's code generation (its own RNG lowering, the dropout hash fused), for full
    recompute of one layer (selective replays through the same mechanism: the default generator inside SDPA;
    CPU code generation costs a minute or more per graph, so one case)."""
    plain, recomputed = (_compiled_grads(g, "gpt", "inductor", num_layers=1) for g in (None, "full"))
    for n, g in recomputed.items():
        assert torch.allclose(g, plain[n], atol=1e-6, rtol=1e-5), n
