"""The FP8 QKV linear as one function handing back q, k and v (gpt3d/model/fp8_qkv.py): its plumbing exactly,
its casts bit for bit, and the model around it.

- plumbing: with the quantization made exact (float64 casts, power-of-two scales, float64 GEMMs) the function is
  the linear then split_qkv, so q, k, v and every gradient equal float64 autograd's, for any kv-group shape; a
  wrong head order, scale pairing or layout would not;
- quantization: the gradient ops give torchao's tensorwise cast of the assembled gradient (the one the
  per-linear path casts) bit for bit, and its column sums (the bias gradient), whatever the sources' strides.
The Triton kernels are checked against this reference on the GPU (benchmarks/fp8_qkv_check.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from tests.support.fuzz import fuzz

from gpt3d.model import fp8_qkv
from gpt3d.model.attention import SelfAttention, split_qkv
from gpt3d.model.fp8 import enable_fp8
from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState

from tests.support.curves import tiny_config
from tests.support.fp8 import (assert_same, assert_trains_like, batch_of, bytes_, count_paths, exact_quantization,
                               fp8_model, scaled_leaves, step, torchao_cast)

GPT = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=250)
GQA = dict(GPT, num_key_value_heads=2, swiglu=True, ffn_hidden_size=128, use_rotary_position_embeddings=True,
           disable_bias_linear=True)

shapes = dict(kv=st.integers(1, 3), group=st.integers(1, 3), hd=st.sampled_from([1, 2, 3, 8]))


@fuzz(30)
@given(tokens=st.integers(1, 9), seed=st.integers(0, 2 ** 31 - 1), **shapes)
def test_assemble_is_split_qkvs_inverse(tokens, kv, group, hd, seed):
    y = torch.randn(tokens, kv * (group + 2) * hd, generator=torch.Generator().manual_seed(seed))
    q, k, v = split_qkv(y, kv, hd)
    assert q.shape == (tokens, kv * group, hd) and k.shape == v.shape == (tokens, kv, hd)
    assert torch.equal(fp8_qkv.assemble(q, k, v), y)


@fuzz(40)
@given(tokens=st.integers(1, 24), h=st.integers(1, 12), bias=st.booleans(), seed=st.integers(0, 2 ** 31 - 1),
       **shapes)
def test_the_function_is_the_linear_then_the_split_when_quantization_is_exact(tokens, h, kv, group, hd, bias, seed):
    with pytest.MonkeyPatch.context() as mp:
        calls = exact_quantization(mp)
        rand = scaled_leaves(torch.Generator().manual_seed(seed))
        n = kv * (group + 2) * hd
        x, w, b = rand(tokens, h), rand(n, h), rand(n) if bias else None
        dq, dk, dv = (rand(tokens, m, hd).detach() for m in (kv * group, kv, kv))
        q, k, v = fp8_qkv._QKV.apply(x, w, b, kv, hd, ("fwd", "dgrad", "wgrad"))
        torch.autograd.backward([q, k, v], [dq, dk, dv])
        assert [c[0] for c in calls] == ["fwd", "dgrad", "wgrad"] and all(c[1] == torch.float64 for c in calls)
        ref = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        want = split_qkv(F.linear(*ref), kv, hd)
        torch.autograd.backward(list(want), [dq, dk, dv])
        got = [q, k, v, x.grad, w.grad] + ([b.grad] if bias else [])
        expected = list(want) + [ref[0].grad, ref[1].grad] + ([ref[2].grad] if bias else [])
        assert_same(got, expected)


@fuzz(40)
@given(tokens=st.integers(1, 24), spread=st.sampled_from([1e-4, 1.0, 3e3]), sums=st.booleans(),
       layout=st.sampled_from(["contiguous", "strided", "heads-major"]), seed=st.integers(0, 2 ** 31 - 1), **shapes)
def test_the_gradient_casts_are_torchaos_cast_of_the_assembled_gradient(tokens, kv, group, hd, spread, sums, layout,
                                                                        seed):
    """Sources as attention's backward may leave them: contiguous, strided views into a wider tensor, or heads
    outermost. Fails if a head is read from the wrong source or place, or a rounding step moves."""
    g = torch.Generator().manual_seed(seed)

    def grad(m):
        if layout == "strided":   # every other head of a wider tensor
            return (torch.randn(tokens, 2 * m, hd, generator=g) * spread).bfloat16()[:, ::2]
        if layout == "heads-major":
            return (torch.randn(m, tokens, hd, generator=g) * spread).bfloat16().transpose(0, 1)
        return (torch.randn(tokens, m, hd, generator=g) * spread).bfloat16()
    dq, dk, dv = grad(kv * group), grad(kv), grad(kv)
    full = fp8_qkv.assemble(dq, dk, dv)
    amax, total = fp8_qkv.qkv_stats(dq, dk, dv, sums)
    assert torch.equal(amax, full.abs().amax().float())
    if sums:
        torch.testing.assert_close(total, full.float().sum(0), rtol=1e-6, atol=1e-6 * float(full.abs().max()))
    else:
        assert total.numel() == 0
    for dtype in (fp8_qkv.E5M2, fp8_qkv.E4M3):
        scale = fp8_qkv.fp8_mlp.to_scale(amax, dtype)
        q8, q8_t = fp8_qkv.qkv_cast(dq, dk, dv, scale, dtype)
        assert torch.equal(bytes_(q8), bytes_(torchao_cast(full, dtype, scale)._data))
        assert torch.equal(bytes_(q8_t), bytes_(q8.t().contiguous()))


def _model(cfg, fused: bool):
    return fp8_model(cfg, fused_qkv=fused)


def test_enable_fp8_fuses_the_qkv_with_tensorwise_scales_and_16_wide_heads():
    ps = ParallelState()
    for recipe, arch, fused in (("tensorwise", GPT, True), ("tensorwise", GQA, True), ("rowwise", GPT, False),
                                ("tensorwise", dict(GPT, num_attention_heads=8), False)):   # head dim 8
        m = GPTModel(tiny_config(**arch).model, ps, seed_everything(3, ps), vocab_size=250)
        enable_fp8(m, recipe, ps.device, emulate=True)
        assert all((a._fused_qkv is not None) is fused for a in m.modules() if isinstance(a, SelfAttention))
    m = _model(tiny_config(**GPT), fused=False)
    assert all(a._fused_qkv is None for a in m.modules() if isinstance(a, SelfAttention))


@pytest.mark.parametrize("arch", [GPT, GQA])
def test_the_fused_model_trains_like_the_per_linear_one(arch):
    """Same recipe, other kernels: the loss and every gradient match the per-linear FP8 model within FP8's
    rounding (the bias is added in the GEMM's epilogue, one rounding fewer)."""
    cfg = tiny_config(**arch)
    assert_trains_like(cfg, _model)


@pytest.mark.parametrize("tokens,fused_calls,fallback_calls", [(32, 2, 0), (31, 0, 2)])
def test_which_path_runs_and_the_fallback_is_the_per_linear_path(monkeypatch, tokens, fused_calls, fallback_calls):
    """Each layer's QKV runs the one function where the token count allows it, else the per-linear GEMM, whose
    results are then the unfused model's bit for bit."""
    cfg = tiny_config(**GPT)
    batch = batch_of(tokens)
    m = _model(cfg, fused=True)
    seen = count_paths(monkeypatch, fp8_qkv._QKV, [a._fused_qkv for a in m.modules() if isinstance(a, SelfAttention)])
    l1, g1 = step(m, batch)
    assert seen == {"fused": fused_calls, "fallback": fallback_calls}
    if fallback_calls:
        l0, g0 = step(_model(cfg, fused=False), batch)
        assert torch.equal(l0, l1) and all(torch.equal(g0[k], g1[k]) for k in g0)


def test_compiled_the_function_gives_eagers_gradients():
    """Under torch.compile (AOTAutograd traces the function, its view outputs and custom ops) the loss and every
    gradient are eager's bit for bit; the GQA layout too. aot_eager: the same graphs without Inductor's codegen."""
    for arch in (GPT, GQA):
        cfg = tiny_config(**arch)
        tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(0))
        eager = _model(cfg, fused=True)
        assert all(a._fused_qkv is not None for a in eager.modules() if isinstance(a, SelfAttention))
        l0, g0 = step(eager, tokens)
        compiled = _model(cfg, fused=True)
        for layer in compiled.layers.values():
            layer.compile(backend="aot_eager", fullgraph=True)
        l1, g1 = step(compiled, tokens)
        assert torch.equal(l0, l1) and all(torch.equal(g0[k], g1[k]) for k in g0)
