"""The bias-gradient fusions (gpt3d/model/bias_grad.py): their gradient ops' reference, the functions in the
model's fusion hooks, and where enable_bias_grad_fusion installs them.

- the ops' reference (the spec benchmarks/bias_grad_check.py checks the Triton kernels against) is autograd's:
  GeLU's gradient and its column sums, and split_qkv's gradient and its column sums, in float64;
- the functions are the unfused modules: the hooked MLP, attention and whole GPT give the plain ones' output and
  every gradient up to float64 rounding, eagerly and compiled (aot_eager); a bias gradient off by one token's
  term would not. At TP=2 with and without SP they train like TP=1 within that test's fp32 bound
  (tests/distributed/test_tensor_parallel.py);
- installed exactly where the rule says: a biased GeLU MLP and a biased QKV linear on torch's GEMMs, not with
  SwiGLU, without biases, or where FP8 runs the GEMMs; by training (build_model_chunks) only on CUDA in bf16/fp16
  with Triton and unless --no-bias-grad-fusion;
- a compiled full-recompute region recomputes them as it does the plain layers (same tensors kept for backward).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from tests.support.fuzz import fuzz

from gpt3d.model import bias_grad, cublaslt
from gpt3d.model.attention import SelfAttention, split_qkv
from gpt3d.model.fp8 import enable_fp8
from gpt3d.model.gpt import MLP, GPTModel
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState

from tests.support.curves import tiny_config
from tests.support.fp8 import assert_same

CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")
GPT = dict(num_layers=2, hidden_size=24, num_attention_heads=4, seq_length=8, vocab_size=250)


def _rand(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@fuzz(30)
@given(tokens=st.integers(1, 20), width=st.integers(1, 40), tanh=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_gelu_reference_is_autograds_gelu_gradient_and_its_sums(tokens, width, tanh, seed):
    g = torch.Generator().manual_seed(seed)
    h, da = _rand(g, tokens, width, scale=3.0).requires_grad_(), _rand(g, tokens, width)
    F.gelu(h, approximate="tanh" if tanh else "none").backward(da)
    dh, sums = bias_grad.gelu_grad_sums(da, h.detach(), tanh)
    assert_same([dh, sums], [h.grad, h.grad.sum(0)])


@fuzz(20)
@given(tokens=st.integers(1, 12), width=st.integers(1, 12), inner=st.integers(1, 12), seed=st.integers(0, 2 ** 31 - 1))
def test_gelu_mm_reference_is_autograds_through_the_gemm(tokens, width, inner, seed):
    """gelu_grad_sums_mm(dy, w2, h): the tanh GeLU's gradient where the GeLU's output gradient is dy @ w2."""
    g = torch.Generator().manual_seed(seed)
    h, dy, w2 = _rand(g, tokens, width, scale=3.0).requires_grad_(), _rand(g, tokens, inner), _rand(g, inner, width)
    F.gelu(h, approximate="tanh").backward(dy @ w2)
    assert_same(list(bias_grad.gelu_grad_sums_mm(dy, w2, h.detach())), [h.grad, h.grad.sum(0)])


@fuzz(30)
@given(tokens=st.integers(1, 12), kv=st.integers(1, 3), group=st.integers(1, 3), hd=st.sampled_from([1, 2, 3, 8]),
       heads_major=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_qkv_reference_is_split_qkvs_gradient_and_its_sums(tokens, kv, group, hd, heads_major, seed):
    g = torch.Generator().manual_seed(seed)
    y = _rand(g, tokens, kv * (group + 2) * hd).requires_grad_()
    q, k, v = split_qkv(y, kv, hd)

    def grad(m):   # as attention's backward may leave them: tokens or heads outermost
        return _rand(g, m, tokens, hd).transpose(0, 1) if heads_major else _rand(g, tokens, m, hd)
    dq, dk, dv = grad(kv * group), grad(kv), grad(kv)
    torch.autograd.backward([q, k, v], [dq, dk, dv])
    full, sums = bias_grad.qkv_grad_sums(dq, dk, dv)
    assert_same([full, sums], [y.grad, y.grad.sum(0)])


def test_the_ops_are_honest_to_torch_compile():
    """Schema, fake shapes and strides (row-major outputs whatever the inputs' layout), AOT dispatch."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        h, da = _rand(g, 5, 7).to(dtype), _rand(g, 5, 7).to(dtype)
        torch.library.opcheck(bias_grad.gelu_grad_sums, (da, h, True), test_utils=CHECKS)
        torch.library.opcheck(bias_grad.gelu_grad_sums, (da.t(), h.t(), False), test_utils=CHECKS)
        dq, dk, dv = _rand(g, 5, 4, 2).to(dtype), _rand(g, 5, 2, 2).to(dtype), _rand(g, 5, 2, 2).to(dtype)
        torch.library.opcheck(bias_grad.qkv_grad_sums, (dq, dk, dv), test_utils=CHECKS)
        dy, w2 = _rand(g, 5, 3).to(dtype), _rand(g, 3, 7).to(dtype)
        torch.library.opcheck(bias_grad.gelu_grad_sums_mm, (dy, w2, h), test_utils=CHECKS)


def _pair(module, cfg, lt: bool = False):
    """(plain, hooked) copies of one float64 module; `lt`: the functions' GEMMs and the remaining linears through
    model/cublaslt.py's ops (their torch references here)."""
    ps = ParallelState()
    torch.manual_seed(0)
    a = module(cfg.model, ps).double()
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.3)
    b = module(cfg.model, ps).double()
    b.load_state_dict(a.state_dict())
    assert bias_grad.enable_bias_grad_fusion(b, lt) == 1
    if lt:
        cublaslt.enable_cublaslt(b)
    return a, b


def _grads(m, x, dy):
    x = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in m.parameters()]


@fuzz(15)
@given(heads=st.integers(1, 3), kv_div=st.sampled_from([1, 0]), hd=st.sampled_from([2, 4]), tokens=st.integers(1, 6),
       tanh=st.booleans(), lt=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_hooked_modules_equal_the_plain_ones_float64(heads, kv_div, hd, tokens, tanh, lt, seed):
    """Output, input gradient and every parameter gradient (fc1's and the QKV bias included); GQA too; with the
    GEMMs through model/cublaslt.py's ops or torch's."""
    kv = heads if kv_div else 1
    cfg = tiny_config(num_layers=2, hidden_size=heads * hd, num_attention_heads=heads, num_key_value_heads=kv,
                      ffn_hidden_size=3 * hd, gelu_approximation="tanh" if tanh else "none")
    g = torch.Generator().manual_seed(seed)
    x, dy = _rand(g, 2, tokens, heads * hd), _rand(g, 2, tokens, heads * hd)
    for module in (MLP, SelfAttention):
        a, b = _pair(module, cfg, lt)
        assert_same(_grads(b, x, dy), _grads(a, x, dy))


def test_a_wrong_bias_gradient_is_caught(monkeypatch):
    """The comparison above sees a bias gradient that misses one token's term."""
    cfg = tiny_config(num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=12)
    g = torch.Generator().manual_seed(1)
    x, dy = _rand(g, 2, 5, 8), _rand(g, 2, 5, 8)
    real = bias_grad._gelu_ref

    def short(da, h, tanh):
        dh, sums = real(da, h, tanh)
        return dh, sums - dh[-1].to(sums.dtype)
    monkeypatch.setattr(bias_grad, "_gelu_ref", short)
    a, b = _pair(MLP, cfg)
    with pytest.raises(AssertionError):
        assert_same(_grads(b, x, dy), _grads(a, x, dy))


def _gpt(cfg, hooked: bool, compiled: bool = False, lt: bool = False):
    ps = ParallelState()
    m = GPTModel(cfg.model, ps, seed_everything(3, ps), vocab_size=250)
    m.init_weights(11)
    m = m.cast_parameters(torch.float64)
    if hooked:
        assert bias_grad.enable_bias_grad_fusion(m, lt) == 2 * cfg.model.num_layers
    if lt:   # with the fused functions only the attention's projection is left to route
        assert cublaslt.enable_cublaslt(m) == (1 if hooked else 4) * cfg.model.num_layers
    if compiled:
        for layer in m.layers.values():
            layer.compile(backend="aot_eager", fullgraph=True)
    return m


def _step(m, tokens):
    m.zero_grad()
    loss = m(tokens, tokens).mean()
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("lt", [False, True])
def test_a_hooked_gpt_trains_like_the_plain_one_float64(compiled, lt):
    """The loss and every gradient of a 2-layer GPT, eager and with each layer compiled (AOTAutograd traces the
    functions, their view outputs and the custom ops; fullgraph: no graph break); with the GEMMs through
    model/cublaslt.py's ops too (every linear: the fused functions' and the others')."""
    cfg = tiny_config(**GPT)
    tokens = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(0))
    assert_same(_step(_gpt(cfg, True, compiled, lt), tokens), _step(_gpt(cfg, False), tokens))


def test_installed_only_on_biased_gelu_mlps_and_biased_qkv_on_torchs_gemms():
    ps = ParallelState()

    def count(hooked_kinds, fp8=False, **arch):
        m = GPTModel(tiny_config(**dict(GPT, hidden_size=32, **arch)).model, ps, seed_everything(3, ps),
                     vocab_size=250)
        if fp8:   # every linear eligible (dims multiples of 16), run per linear
            assert enable_fp8(m, "tensorwise", ps.device, emulate=True, fused_mlp=False, fused_qkv=False) == 8
        n = bias_grad.enable_bias_grad_fusion(m)
        got = {type(x).__name__ for x in m.modules()
               if getattr(x, "_fused", None) is not None or getattr(x, "_fused_qkv", None) is not None}
        assert got == hooked_kinds, arch
        return n
    assert count({"MLP", "SelfAttention"}) == 4
    assert count({"SelfAttention"}, swiglu=True, ffn_hidden_size=64) == 2
    assert count(set(), disable_bias_linear=True) == 0
    assert count(set(), fp8=True) == 0   # the FP8 GEMMs stay FP8
    m = GPTModel(tiny_config(**dict(GPT, hidden_size=32)).model, ps, seed_everything(3, ps), vocab_size=250)
    bias_grad.enable_bias_grad_fusion(m)
    with pytest.raises(RuntimeError, match="enable_fp8 must come before"):   # else they would keep bf16 GEMMs
        enable_fp8(m, "rowwise", ps.device, emulate=True)


@fuzz(20)
@given(device=st.sampled_from(["cpu", "cuda", "meta"]), triton=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]))
def test_training_fuses_on_cuda_in_half_precision_where_triton_loaded(device, triton, dtype):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bias_grad, "TRITON", triton)
        want = device == "cuda" and triton and dtype in (torch.bfloat16, torch.float16)
        assert bias_grad.bias_grad_fusion_applies(torch.device(device), dtype) is want


@pytest.mark.parametrize("switch", [False, True])
@pytest.mark.parametrize("applies", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_build_model_chunks_installs_them_where_the_rule_applies_after_fp8(monkeypatch, switch, applies, fp8):
    """Training's model gets the functions exactly where --bias-grad-fusion (default on) and
    bias_grad_fusion_applies (forced here: on CPU it never holds) both say so, and only on the linears FP8 left to
    torch's GEMMs. (That they train like the plain model: the tests above.)"""
    import gpt3d.model.build as build
    seen = []
    monkeypatch.setattr(build, "bias_grad_fusion_applies", lambda d, t: seen.append((d.type, t)) or applies)
    if fp8:   # emulated on CPU; tensorwise gives the MLP and QKV FP8 functions of their own
        monkeypatch.setattr(build, "enable_fp8", functools.partial(enable_fp8, emulate=True))
    cfg = tiny_config(**dict(GPT, hidden_size=32), compile=False, fp8=fp8, bf16=fp8, bias_grad_fusion=switch)
    assert tiny_config().model.bias_grad_fusion   # on unless switched off
    ps = ParallelState()
    (m,) = build.build_model_chunks(cfg, ps, seed_everything(1, ps), vocab_size=250).chunks
    assert seen == ([("cpu", build.param_dtype(cfg.precision))] if switch else [])
    mlps = [x for x in m.modules() if isinstance(x, MLP)]
    attn = [x for x in m.modules() if isinstance(x, SelfAttention)]
    want = switch and applies and not fp8
    assert mlps and attn
    assert all(isinstance(x._fused, bias_grad.FusedGeluMLP) is want for x in mlps)
    assert all(isinstance(x._fused_qkv, bias_grad.FusedQKV) is want for x in attn)


def test_full_recompute_keeps_what_it_keeps_without_them_compiled(monkeypatch):
    """Inside a compiled full-recompute region the functions' forwards are recomputed like the plain layers': the
    forward leaves the same tensors for backward (count and bytes) with and without them. (Were their saved
    h / GeLU(h) kept instead, full recompute would save less memory than the planner counts.)"""
    import gpt3d.model.build as build

    def saved(fused: bool) -> tuple[int, int]:
        monkeypatch.setattr(build, "bias_grad_fusion_applies", lambda d, t: fused)
        cfg = tiny_config(**dict(GPT, hidden_size=32, seq_length=16), compile=True, compile_granularity="chunk",
                          recompute_granularity="full")
        ps = ParallelState()
        torch._dynamo.reset()
        (m,) = build.build_model_chunks(cfg, ps, seed_everything(1, ps), vocab_size=250).chunks
        assert any(isinstance(x._fused, bias_grad.FusedGeluMLP) for x in m.modules() if isinstance(x, MLP)) is fused
        sizes: list = []
        tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = m(tokens, tokens).mean()
        loss.backward()
        return len(sizes), sum(sizes)
    plain = saved(False)
    assert saved(True) == plain and plain[0] > 0
