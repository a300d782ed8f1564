"""FP8 weights cast once a step (gpt3d/model/fp8_weights.py): the same bits as casting them in every forward,
in every FP8 path (per linear through torchao, the MLP and QKV functions), used where held, transposed copies
only where a backward reads them, gone on exit, no recompilation from one step's copies to the next nor
around an evaluation, and the train step holding them exactly where a weight is cast more than once (several
micro-batches, full recompute, evaluation). FP8 is emulated on CPU."""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from hypothesis import given, strategies as st
from torch._dynamo.utils import counters

from tests.support.curves import make_trainer, run_curve, tiny_config
from tests.support.fuzz import fuzz

import gpt3d.model.build as build
from gpt3d.model import fp8_mlp, fp8_weights
from gpt3d.model.build import compile_chunks
from gpt3d.model.fp8 import enable_fp8
from gpt3d.model.fp8_mlp import E4M3, WEIGHT_CAST, ScaledCast, cast_with_scale
from gpt3d.model.fp8_weights import fp8_weights as weights_of, held_casts, holds_casts, weight_caster
from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState

GPT = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=250)
LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, seq_length=32,
             vocab_size=250, swiglu=True, ffn_hidden_size=128, use_rotary_position_embeddings=True,
             normalization="rmsnorm", disable_bias_linear=True, untie_embeddings_and_output_weights=True)
ARCH = {"gpt": GPT, "llama": LLAMA, "swiglu+bias": dict(LLAMA, disable_bias_linear=False)}


def _model(arch: str, fused_mlp: bool, fused_qkv: bool, dtype: torch.dtype = torch.float32) -> GPTModel:
    cfg = tiny_config(**ARCH[arch], recompute_granularity=None)
    ps = ParallelState()
    m = GPTModel(cfg.model, ps, seed_everything(3, ps), vocab_size=250)
    m.init_weights(11)
    n = enable_fp8(m, "tensorwise", ps.device, emulate=True, fused_mlp=fused_mlp, fused_swiglu=True,
                   fused_qkv=fused_qkv)
    assert n == len(weights_of(m.modules())) > 0
    return m.cast_parameters(dtype)


def _steps(m: GPTModel, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """Each micro-batch's loss and the gradients summed over them."""
    m.zero_grad()
    losses = []
    for tokens in batches:
        loss = m(tokens, tokens).float().mean()
        loss.backward()
        losses.append(loss.detach())
    return losses, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


@fuzz(16)
@given(arch=st.sampled_from(sorted(ARCH)), fused_mlp=st.booleans(), fused_qkv=st.booleans(),
       micro=st.integers(1, 3), bf16=st.booleans(), transposes=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_held_casts_give_the_bits_of_casting_in_every_forward(arch, fused_mlp, fused_qkv, micro, bf16, transposes,
                                                              seed):
    """Also held without the transposed copies (as for a forward-only pass): a backward transposes the copy."""
    m = _model(arch, fused_mlp, fused_qkv, torch.bfloat16 if bf16 else torch.float32)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 250, (2, 32), generator=g) for _ in range(micro)]
    want = _steps(m, batches)
    held = weights_of(m.modules())
    weights = [w for w, _ in held]
    casts = []
    real = fp8_mlp.cast
    with pytest.MonkeyPatch.context() as mp:   # inside, no weight is cast again: only activations and gradients
        mp.setattr(fp8_mlp, "cast", lambda t, dtype: casts.append(t) or real(t, dtype))
        with held_casts(held, transposes=transposes):
            assert all(getattr(w, WEIGHT_CAST) is not None for w in weights)
            got = _steps(m, batches)
    assert not any(c is w for c in casts for w in weights)
    assert all(torch.equal(a, b) for a, b in zip(want[0], got[0]))
    assert want[1].keys() == got[1].keys()
    assert all(torch.equal(want[1][k], got[1][k]) for k in want[1]), arch
    assert not any(hasattr(w, WEIGHT_CAST) for w in weights)   # gone on exit


@pytest.mark.parametrize("arch", sorted(ARCH))
@pytest.mark.parametrize("fused_mlp", [False, True])
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_transposed_copies_only_where_a_backward_reads_them(arch, fused_mlp, fused_qkv):
    """The MLP and QKV functions' weights hold a transposed copy in training (their backward reads it); torchao's
    per-linear path, and any forward-only pass, hold none."""
    m = _model(arch, fused_mlp, fused_qkv)
    held = weights_of(m.modules())
    names = {id(p): k.split(".")[-2] for k, p in m.named_parameters() if k.count(".") >= 1}
    want = {"qkv": fused_qkv, "proj": False, "fc1": fused_mlp, "fc2": fused_mlp, "gate": fused_mlp}
    assert {names[id(w)] for w, _ in held} == {"qkv", "proj", "fc1", "fc2"} | ({"gate"} if arch != "gpt" else set())
    assert all(t is want[names[id(w)]] for w, t in held)
    for transposes in (True, False):
        with held_casts(held, transposes=transposes):
            assert all((getattr(w, WEIGHT_CAST).data_t is not None) is (t and transposes) for w, t in held)


@pytest.mark.parametrize("arch,fused", [("gpt", True), ("gpt", False), ("llama", True), ("llama", False)])
def test_every_fp8_path_uses_the_held_copies(arch, fused):
    """A held copy that differs from the weight's cast changes the output: the functions read the copies
    (per linear through torchao where `fused` is False, the MLP and QKV functions where it is True)."""
    m = _model(arch, fused, fused)
    tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m(tokens, tokens)
    for w, t in weights_of(m.modules()):
        with held_casts([(w, t)]):
            w8, w8_t, scale, inv = getattr(w, WEIGHT_CAST)
            with torch.no_grad():
                assert torch.equal(m(tokens, tokens), want)
            zeros_t = None if w8_t is None else torch.zeros_like(w8_t)
            setattr(w, WEIGHT_CAST, ScaledCast(torch.zeros_like(w8), zeros_t, scale, inv))
            with torch.no_grad():
                assert not torch.equal(m(tokens, tokens), want)


def test_each_entry_casts_the_weights_as_they_are_then():
    m = _model("llama", True, True)
    weights = weights_of(m.modules())
    with held_casts(weights):
        first = [getattr(w, WEIGHT_CAST).data.clone() for w, _ in weights]
    with torch.no_grad():
        for w, _ in weights:
            w.mul_(1.5).add_(0.01)
    with held_casts(weights):
        for (w, t), old in zip(weights, first):
            held = getattr(w, WEIGHT_CAST)
            fresh = cast_with_scale(w.detach(), E4M3, t)
            assert all(a is b is None or torch.equal(a, b) for a, b in zip(held, fresh))
            assert not torch.equal(held.data, old)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_new_copies_each_step_do_not_recompile(arch):
    """Compiled per layer (as FP8 chunks are; aot_eager: the joint graph reads the copies), two steps each with
    their own held copies run one graph, without a graph break, and give the uncompiled steps' bits; a step
    without held copies, a forward-only pass holding them (as an evaluation does) and another step without
    need one graph more, not two (the attribute is gone again, not None)."""
    eager = _model(arch, True, True)
    m = _model(arch, True, True)
    tokens = [torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    torch._dynamo.reset()
    counters.clear()
    compile_chunks([m], ParallelState(), "layer", backend="aot_eager")
    cast = weight_caster(False)
    for model in (eager, m):
        for t in tokens:
            with held_casts(weights_of(model.modules()), cast):
                model(t, t).float().mean().backward()
            with torch.no_grad():
                for w in model.parameters():   # new weights, hence new copies, for the next step
                    w.sub_(0.01 * w.grad)
                    w.grad = None
    held_graphs = dict(counters["stats"])["unique_graphs"]
    m(tokens[0], tokens[0]).float().mean().backward()
    with torch.no_grad(), held_casts(weights_of(m.modules()), cast, transposes=False):
        m(tokens[0], tokens[0])
    m(tokens[1], tokens[1]).float().mean().backward()
    stats, breaks = dict(counters["stats"]), sum(counters["graph_break"].values())
    torch._dynamo.reset()
    assert breaks == 0 and held_graphs == 1, (stats, breaks)
    assert all(torch.equal(a, b) for a, b in zip(eager.parameters(), m.parameters()))
    assert stats["unique_graphs"] <= 1 + 2, stats   # + without held copies, + forward-only without transposes


@pytest.mark.parametrize("micro,recompute,hold", [(1, None, False), (2, None, True), (4, None, True),
                                                  (1, "full", True), (1, "selective", False)])
def test_weights_are_held_where_a_step_casts_them_more_than_once(micro, recompute, hold):
    assert holds_casts(micro, recompute) is hold


@pytest.mark.parametrize("micro,recompute", [(1, None), (3, None), (1, "full")])
def test_the_train_step_holds_casts_and_trains_the_same(monkeypatch, micro, recompute):
    """Three optimizer steps and an evaluation with held casts where holds_casts says give the losses, gradient
    norms, validation loss and parameters of a run that never holds them; a step holds them (with transposes)
    exactly where holds_casts says, the evaluation (its micro-batches, forward only, no transposes) too."""
    monkeypatch.setattr(build, "enable_fp8", functools.partial(enable_fp8, emulate=True, fused_swiglu=True))
    real = fp8_weights.held_casts
    runs, entries = [], []
    for hold in (True, False):
        with monkeypatch.context() as mp:
            if hold:
                mp.setattr("gpt3d.train.step.held_casts",
                           lambda w, c, transposes: entries.append((len(w), transposes)) or real(w, c, transposes))
            else:
                mp.setattr("gpt3d.train.step.held_casts", lambda *a, **k: contextlib.nullcontext())
            cfg = tiny_config(**LLAMA, fp8=True, bf16=True, compile=False, micro_batch_size=2,
                              global_batch_size=2 * micro, train_iters=3, eval_iters=2,
                              recompute_granularity=recompute)
            t = make_trainer(cfg)
            curve = run_curve(cfg, trainer=t)
            runs.append((curve["losses"], curve["norms"], curve["val"],
                         [p.detach().clone() for c in t.model for p in c.parameters()]))
    layers = LLAMA["num_layers"] * 5   # qkv, proj, gate, fc1, fc2
    assert entries == [(layers, True)] * (3 if holds_casts(micro, recompute) else 0) + [(layers, False)]
    assert runs[0][:3] == runs[1][:3]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][3], runs[1][3]))
