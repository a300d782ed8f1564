"""The FP8 MLP (GeLU, SwiGLU) as one function (gpt3d/model/fp8_mlp.py): its plumbing exactly, its casts bit for
bit.

Two separate claims, each checked exactly:
- plumbing: with the quantization made exact (float64 casts, power-of-two scales, float64 GEMMs) the function is
  the plain MLP, so output and every gradient equal float64 autograd's; a wrong layout, transpose, scale
  pairing or GeLU-derivative would not;
- quantization: its casts are torchao's tensorwise casts bit for bit (input, weights, output gradient), and
  the activation casts are torchao's cast of the very activation / gradients the unfused model computes.
The Triton kernels are checked against this reference on the GPU (benchmarks/fp8_mlp_check.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from tests.support.fuzz import fuzz

from gpt3d.model import fp8_mlp
from gpt3d.model.fp8 import enable_fp8
from gpt3d.model.gpt import MLP, GPTModel
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState

from tests.support.curves import tiny_config
from tests.support.fp8 import bytes_ as _bytes
from tests.support.fp8 import exact_quantization as _exact_quantization
from tests.support.fp8 import assert_same, assert_trains_like, batch_of, count_paths, fp8_model, scaled_leaves, step
from tests.support.fp8 import torchao_cast as _torchao_cast

GPT = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=250)
SWIGLU = dict(swiglu=True, ffn_hidden_size=128)


# the GEMMs in order: forward first linear(s), fc2; backward fc2's dgrad, wgrad, then the first linears'
ORDER = {"gelu": ["fwd"] * 2 + ["dgrad", "wgrad"] * 2,
         "swiglu": ["fwd"] * 3 + ["dgrad", "wgrad", "dgrad", "dgrad", "wgrad", "wgrad"]}


# the SwiGLU backward with the down projection's dgrad epilogue (fp8_mlp.swiglu_dgrad): fc2's wgrad first, then
# its input gradient inside swiglu_dgrad, without fast accumulation (the epilogue serves only where dgrad asks
# for none: its flag "" here, "dgrad" where it asks for it), then the first linears'
EPILOGUE_ORDER = ["fwd"] * 3 + ["wgrad", False, "", "", "wgrad", "wgrad"]


@fuzz(40)
@given(tokens=st.integers(1, 40), h=st.integers(1, 24), f=st.integers(1, 40), swiglu=st.booleans(),
       tanh=st.booleans(), bias=st.booleans(), epilogue=st.booleans(), fast_dgrad=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_the_function_is_the_mlp_when_quantization_is_exact(tokens, h, f, swiglu, tanh, bias, epilogue, fast_dgrad,
                                                             seed):
    """Also with the SwiGLU backward's dgrad epilogue (run here by its torch reference), which biases and fast
    accumulation in dgrad rule out."""
    with pytest.MonkeyPatch.context() as mp:
        calls = _exact_quantization(mp)
        rand = scaled_leaves(torch.Generator().manual_seed(seed))
        x, dy = rand(tokens, h), rand(tokens, h).detach()
        firsts = [(rand(f, h), rand(f) if bias else None) for _ in range(2 if swiglu else 1)]   # (gate,) fc1
        w2 = rand(h, f)
        weights = [t for pair in firsts for t in pair] + [w2]
        if swiglu:
            flag = "dgrad" if fast_dgrad or not epilogue else ""   # truthy: fast accumulation asked for
            y = fp8_mlp._SwiGLUMLP.apply(x, *weights, ("fwd", flag, "wgrad"), epilogue)
        else:
            y = fp8_mlp._GeluMLP.apply(x, *weights, tanh, ("fwd", "dgrad", "wgrad"))
        y.backward(dy)
        leaves = [x] + [t for t in weights if t is not None]
        got = [y.detach()] + [t.grad for t in leaves]
        flag = "dgrad" if fast_dgrad or not (epilogue and swiglu) else ""
        plain = [flag if c == "dgrad" else c for c in ORDER["swiglu" if swiglu else "gelu"]]
        used = epilogue and swiglu and not bias and not fast_dgrad
        assert [c[0] for c in calls] == (EPILOGUE_ORDER if used else plain)
        assert all(c[1] == torch.float64 for c in calls)
        ref = [t.detach().clone().requires_grad_() if t is not None else None for t in [x] + weights]
        lin = [F.linear(ref[0], ref[1 + 2 * i], ref[2 + 2 * i]) for i in range(len(firsts))]
        act = F.silu(lin[0]) * lin[1] if swiglu else F.gelu(lin[0], approximate="tanh" if tanh else "none")
        yr = F.linear(act, ref[-1])
        yr.backward(dy)
        want = [yr.detach()] + [t.grad for t in ref if t is not None]
        assert_same(got, want)


@fuzz(40)
@given(rows=st.integers(1, 24), cols=st.integers(1, 40), spread=st.sampled_from([1e-4, 1.0, 3e3]),
       tanh=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_the_casts_are_torchaos_bits(rows, cols, spread, tanh, seed):
    """cast(): torchao's dynamic tensorwise cast (bytes, scale) in both layouts. The GeLU ops: torchao's cast
    of the bf16 GeLU output (E4M3) and GeLU gradient (E5M2) the unfused model computes, scaled from their
    amax; the column sums are that gradient's (the bias gradient). Fails if a rounding step is dropped or
    moved (e.g. scaling the fp32 GeLU before its bf16 rounding)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, cols, generator=g) * spread).to(torch.bfloat16)
    da = (torch.randn(rows, cols, generator=g) / spread).to(torch.bfloat16)
    for dtype in (fp8_mlp.E4M3, fp8_mlp.E5M2):
        q, q_t, inv = fp8_mlp.cast(h, dtype)
        ref = _torchao_cast(h, dtype)
        assert torch.equal(_bytes(q), _bytes(ref._data))
        assert torch.equal(_bytes(q_t), _bytes(q.t().contiguous())) and torch.equal(inv, ref._scale.reciprocal())
    approximate = "tanh" if tanh else "none"
    hf = h.float()   # the unfused model's GeLU (forward, backward): computed in fp32, stored in bf16
    for value, da_in, dtype in ((F.gelu(hf, approximate=approximate).bfloat16(), None, fp8_mlp.E4M3),
                                (torch.ops.aten.gelu_backward(da.float(), hf, approximate=approximate).bfloat16(), da,
                                 fp8_mlp.E5M2)):
        amax, sums = fp8_mlp.gelu_stats(h, da_in, tanh)
        assert torch.equal(amax, value.abs().amax().float())
        if da_in is not None:
            torch.testing.assert_close(sums, value.float().sum(0), rtol=1e-6, atol=1e-6 * float(value.abs().max()))
        scale = fp8_mlp.to_scale(amax, dtype)
        q, q_t = fp8_mlp.gelu_cast(h, da_in, scale, tanh, dtype)
        ref = _torchao_cast(value, dtype, scale)
        assert torch.equal(_bytes(q), _bytes(ref._data))
        assert torch.equal(_bytes(q_t), _bytes(q.t().contiguous()))


@fuzz(40)
@given(rows=st.integers(1, 24), cols=st.integers(1, 40), spread=st.sampled_from([1e-3, 1.0, 30.0]),
       sums=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_the_swiglu_casts_are_torchaos_bits(rows, cols, spread, sums, seed):
    """The SwiGLU ops: torchao's cast of the bf16 SiLU(gate) * up the unfused model computes (E4M3), and of
    its two bf16 gradients (E5M2, each its own scale: d up = da * SiLU(gate), d gate = SiLU's backward of
    da * up); the column sums are those gradients' (the bias gradients)."""
    g = torch.Generator().manual_seed(seed)
    gate, up = ((torch.randn(rows, cols, generator=g) * spread).to(torch.bfloat16) for _ in range(2))
    da = (torch.randn(rows, cols, generator=g) / spread).to(torch.bfloat16)
    s = F.silu(gate.float()).bfloat16()   # the unfused model: SiLU in fp32 stored in bf16, products in bf16
    d_up, d_s = da * s, da * up
    d_gate = torch.ops.aten.silu_backward(d_s.float(), gate.float()).bfloat16()
    for da_in, values, dtype in ((None, [s * up], fp8_mlp.E4M3), (da, [d_up, d_gate], fp8_mlp.E5M2)):
        amax, total = fp8_mlp.swiglu_stats(gate, up, da_in, sums)
        assert torch.equal(amax, torch.stack([v.abs().amax().float() for v in values]))
        if da_in is not None and sums:
            for t, v in zip(total, values, strict=True):
                torch.testing.assert_close(t, v.float().sum(0), rtol=1e-6, atol=1e-6 * float(v.abs().max()))
        else:
            assert total.numel() == 0
        scale = fp8_mlp.to_scale(amax, dtype)
        out = fp8_mlp.swiglu_cast(gate, up, da_in, scale, dtype)
        assert len(out) == 2 * len(values)
        for i, v in enumerate(values):
            assert torch.equal(_bytes(out[2 * i]), _bytes(_torchao_cast(v, dtype, scale[i])._data))
            assert torch.equal(_bytes(out[2 * i + 1]), _bytes(out[2 * i].t().contiguous()))


@fuzz(40)
@given(rows=st.integers(1, 24), cols=st.integers(1, 40), hidden=st.sampled_from([16, 32]),
       spread=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 2 ** 31 - 1))
def test_the_dgrad_epilogue_ops_are_their_spec(rows, cols, hidden, spread, seed):
    """swiglu_dgrad (the reference of quack's GEMM with SwiGLU's backward in its epilogue): da = dy8 @ w2^T in
    fp32, not rounded, d up = da * SiLU(gate) and d gate = da * up * SiLU'(gate) rounded once to bf16, and the
    amaxes of those rounded values; cast_pair: torchao's cast of each at its own scale, both layouts. Fails if
    da is rounded first, the gradients swap, or a scale pairs with the wrong tensor."""
    g = torch.Generator().manual_seed(seed)
    gate, up = ((torch.randn(rows, cols, generator=g) * spread).to(torch.bfloat16) for _ in range(2))
    dy = (torch.randn(rows, hidden, generator=g) / spread).to(torch.bfloat16)
    w2 = (torch.randn(hidden, cols, generator=g) * 0.1).to(torch.bfloat16)
    dy8, _, inv_dy = fp8_mlp.cast(dy, fp8_mlp.E5M2)
    _, w2_8t, inv_w2 = fp8_mlp.cast(w2, fp8_mlp.E4M3)
    du, dg, amax = fp8_mlp.swiglu_dgrad(dy8, w2_8t, inv_dy, inv_w2, gate, up)
    da = torch._scaled_mm(dy8, w2_8t.t(), scale_a=inv_dy, scale_b=inv_w2, out_dtype=torch.float32)
    gf, uf = gate.double(), up.double()
    sig = torch.sigmoid(gf)
    want = [(da.double() * gf * sig), da.double() * uf * sig * (1 + gf * (1 - sig))]
    for got, w in zip((du, dg), want, strict=True):
        # fp32 math then one rounding: float64's value rounded, but where fp32's last bit moves a rounding (rare),
        # and then one bf16 step off; rounding da first moves about a quarter of them
        assert got.dtype == torch.bfloat16
        assert int((got != w.to(torch.bfloat16)).sum()) <= 1 + got.numel() // 100
        torch.testing.assert_close(got.double(), w, rtol=2 ** -7, atol=1e-30)
    assert torch.equal(amax, torch.stack([du.abs().amax().float(), dg.abs().amax().float()]))
    scale = fp8_mlp.to_scale(amax, fp8_mlp.E5M2)
    out = fp8_mlp.cast_pair(du, dg, scale, fp8_mlp.E5M2)
    for i, v in enumerate((du, dg)):
        assert torch.equal(_bytes(out[2 * i]), _bytes(_torchao_cast(v, fp8_mlp.E5M2, scale[i])._data))
        assert torch.equal(_bytes(out[2 * i + 1]), _bytes(out[2 * i].t().contiguous()))


def test_a_failing_quack_epilogue_warns_once_and_the_reference_serves(monkeypatch):
    """swiglu_dgrad's CUDA kernel (run here on CPU tensors): where quack raises (e.g. its first compile), one
    warning, the reference's result, and quack not tried again."""
    monkeypatch.setattr(fp8_mlp, "_QUACK_FAILED", [])
    tried = []

    def broken(*a):
        tried.append(1)
        raise RuntimeError("compile failed")
    monkeypatch.setattr(fp8_mlp.quack_gemm, "mm_dswiglu_amax", broken)
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(16, 32, generator=g).to(torch.bfloat16) for _ in range(2))
    dy8, _, inv_dy = fp8_mlp.cast(torch.randn(16, 16, generator=g).to(torch.bfloat16), fp8_mlp.E5M2)
    _, w2_8t, inv_w2 = fp8_mlp.cast(torch.randn(16, 32, generator=g).to(torch.bfloat16), fp8_mlp.E4M3)
    args = (dy8, w2_8t, inv_dy, inv_w2, gate, up)
    with pytest.warns(RuntimeWarning, match="compile failed"):
        first = fp8_mlp._swiglu_dgrad_quack(*args)
    second = fp8_mlp._swiglu_dgrad_quack(*args)
    want = fp8_mlp.swiglu_dgrad(*args)
    assert all(torch.equal(a, b) and torch.equal(b, c) for a, b, c in zip(first, second, want, strict=True))
    assert tried == [1]


@pytest.mark.parametrize("epilogue", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fast_dgrad", [False, True])
def test_the_epilogue_runs_only_without_biases_and_fast_dgrad(monkeypatch, epilogue, bias, fast_dgrad):
    """Every combination: swiglu_dgrad runs exactly where the function has the epilogue, the MLP no biases (no
    column sums in that epilogue) and dgrad no fast accumulation (quack's FP8 GEMMs promote periodically)."""
    seen = []
    real = fp8_mlp.swiglu_dgrad
    monkeypatch.setattr(fp8_mlp, "swiglu_dgrad", lambda *a: seen.append(1) or real(*a))
    rand = scaled_leaves(torch.Generator().manual_seed(5))
    x, dy = rand(16, 16), rand(16, 16).detach()
    weights = [rand(32, 16), rand(32) if bias else None, rand(32, 16), rand(32) if bias else None, rand(16, 32)]
    fast = (True, fast_dgrad, False)
    with pytest.MonkeyPatch.context() as mp:
        _exact_quantization(mp)
        fp8_mlp._SwiGLUMLP.apply(x, *weights, fast, epilogue).backward(dy)
    assert len(seen) == int(epilogue and not bias and not fast_dgrad)


@pytest.mark.parametrize("loads", [False, True])
def test_enable_fp8_gives_swiglu_functions_the_dgrad_epilogue_where_it_loads(monkeypatch, loads):
    """Asked once per model with its device, only of models with SwiGLU MLPs, and only they take it (GeLU's
    backward has its own passes); not offered on CPU. By default a SwiGLU MLP runs as one function exactly where
    the epilogue loads."""
    assert not fp8_mlp.dgrad_epilogue_loads(torch.device("cpu"))
    asked = []
    monkeypatch.setattr(fp8_mlp, "dgrad_epilogue_loads", lambda device: asked.append(device) or loads)
    for arch, swiglu in ((SWIGLU, True), ({}, False)):
        m = _model(tiny_config(**GPT, **arch, disable_bias_linear=True), fused=True)
        fused = [mlp._fused for mlp in m.modules() if isinstance(mlp, MLP)]
        assert len(fused) == GPT["num_layers"] and all(f.epilogue is (loads and swiglu) for f in fused)
    assert asked == [torch.device("cpu")]
    ps = ParallelState()
    for bias, kw in ((False, {}), (True, {}), (False, dict(fused_swiglu=False)), (False, dict(fused_mlp=False))):
        asked.clear()
        m = GPTModel(tiny_config(**GPT, **SWIGLU, disable_bias_linear=not bias).model, ps, seed_everything(3, ps),
                     vocab_size=250)
        enable_fp8(m, "tensorwise", ps.device, emulate=True, **kw)   # by default, as build_model_chunks calls it
        fused = [mlp._fused for mlp in m.modules() if isinstance(mlp, MLP)]
        # the function exactly where its backward takes the epilogue: no biases; fused_swiglu=False (or no fused
        # MLP at all) runs per linear and does not ask (asking imports quack)
        taken = loads and not bias and not kw
        assert len(fused) == GPT["num_layers"] and all((f is not None and f.epilogue) if taken else f is None
                                                       for f in fused)
        assert len(asked) == (0 if kw else 1)


def _model(cfg, fused: bool):
    return fp8_model(cfg, fused_mlp=fused, fused_swiglu=fused, fused_qkv=fused)


def test_enable_fp8_fuses_the_mlp_only_with_tensorwise_scales():
    """GeLU MLPs by default; SwiGLU ones when asked (fused_swiglu) or where their backward's epilogue loads
    (not on CPU: the test below); never with the rowwise recipes."""
    cfg = tiny_config(**GPT)
    ps = ParallelState()
    for recipe, arch, swiglu_too, fused in (("tensorwise", {}, False, True), ("rowwise", {}, False, False),
                                            ("tensorwise", SWIGLU, False, False), ("tensorwise", SWIGLU, True, True),
                                            ("rowwise", SWIGLU, True, False)):
        m = GPTModel(tiny_config(**GPT, **arch).model, ps, seed_everything(3, ps), vocab_size=250)
        if swiglu_too:
            enable_fp8(m, recipe, ps.device, emulate=True, fused_swiglu=True)
        else:   # the default, as build_model_chunks calls it
            enable_fp8(m, recipe, ps.device, emulate=True)
        assert all((mlp._fused is not None) is fused for mlp in m.modules() if isinstance(mlp, MLP))
    plain = _model(cfg, fused=False)
    assert all(mlp._fused is None for mlp in plain.modules() if isinstance(mlp, MLP))


@pytest.mark.parametrize("arch", [{}, SWIGLU, dict(SWIGLU, disable_bias_linear=True)])
def test_the_fused_model_trains_like_the_per_linear_one(arch):
    """Same recipe, other kernels: the loss and every gradient match the per-linear FP8 model within FP8's
    rounding (a byte of a cast may round the other way where a bf16 input differs in its last bit)."""
    cfg = tiny_config(**GPT, **arch)
    assert_trains_like(cfg, _model)


def test_the_model_with_the_dgrad_epilogue_trains_like_the_per_linear_one(monkeypatch):
    """The SwiGLU MLP's backward through swiglu_dgrad and cast_pair (their references, on CPU): loss and gradients
    as the per-linear FP8 model's within FP8's rounding."""
    monkeypatch.setattr(fp8_mlp, "dgrad_epilogue_loads", lambda device: True)
    seen = []
    real = fp8_mlp.swiglu_dgrad
    monkeypatch.setattr(fp8_mlp, "swiglu_dgrad", lambda *a: seen.append(1) or real(*a))
    assert_trains_like(tiny_config(**GPT, **SWIGLU, disable_bias_linear=True), _model)
    assert len(seen) == GPT["num_layers"]


@pytest.mark.parametrize("arch", [{}, SWIGLU])
def test_token_counts_fp8_gemms_cannot_take_run_per_linear(arch):
    """31 tokens (not a multiple of 16): the fused MLP hands over to the per-linear path, bit for bit."""
    cfg = tiny_config(**GPT, **arch)
    tokens = torch.randint(0, 250, (1, 31), generator=torch.Generator().manual_seed(0))
    l0, g0 = step(_model(cfg, fused=False), tokens)
    l1, g1 = step(_model(cfg, fused=True), tokens)
    assert torch.equal(l0, l1) and all(torch.equal(g0[k], g1[k]) for k in g0)


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("tokens,fused_calls,fallback_calls", [(32, 2, 0), (31, 0, 2)])
def test_which_path_runs(monkeypatch, tokens, fused_calls, fallback_calls, swiglu):
    """Each MLP (two layers) runs its one function where the token count allows it, else the per-linear path."""
    m = _model(tiny_config(**GPT, **(SWIGLU if swiglu else {})), fused=True)
    fn = fp8_mlp._SwiGLUMLP if swiglu else fp8_mlp._GeluMLP
    seen = count_paths(monkeypatch, fn, [mlp._fused for mlp in m.modules() if isinstance(mlp, MLP)])
    step(m, batch_of(tokens))
    assert seen == {"fused": fused_calls, "fallback": fallback_calls}
