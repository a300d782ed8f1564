"""Gradient-accumulation fusion (gpt3d/model/grad_accumulation.py): weight-gradient GEMMs that add into the
gradient buffer themselves give the buffer what autograd's gradients and the hooks' adds give it, for every GEMM
function that declares it, under torch.compile too; and the weights it must not take are left to the hooks."""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, strategies as st
from torch._dynamo.utils import counters

import gpt3d.optim.grad_buffer as gb
from gpt3d.config import ModelConfig
from gpt3d.model.bias_grad import enable_bias_grad_fusion
from gpt3d.model.build import compile_chunks
from gpt3d.model.fp8 import enable_fp8
from gpt3d.model.grad_accumulation import accumulates_in_backward, enable_grad_accumulation_fusion
from gpt3d.model.gpt import GPTModel
from gpt3d.optim.grad_buffer import GradBuffer
from gpt3d.parallel.param_meta import param_meta
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState
from tests.support.curves import float64
from tests.support.fuzz import fuzz

LLAMA = dict(use_rotary_position_embeddings=True, normalization="rmsnorm", swiglu=True, disable_bias_linear=True,
             num_key_value_heads=2)


def _model(arch: str, fused_functions: bool, fusion: bool, layers: int = 2, dtype=None, fp8: bool = False,
           **extra) -> GPTModel:
    cfg = ModelConfig(num_layers=layers, hidden_size=16, num_attention_heads=4, seq_length=8, hidden_dropout=0.0,
                      attention_dropout=0.0, **(LLAMA if arch == "llama" else {}), **extra)
    ps = ParallelState()
    model = GPTModel(cfg, ps, seed_everything(3, ps), vocab_size=64)
    model.init_weights(3)
    if dtype is not None:
        model.cast_parameters(dtype)
    if fp8:   # emulated on CPU, as build_model_chunks orders it: FP8 first
        enable_fp8(model, "tensorwise", ps.device, emulate=True)
    if fused_functions:   # model/bias_grad.py's GeLU MLP and QKV functions (their torch references on CPU)
        enable_bias_grad_fusion(model)
    if fusion:
        enable_grad_accumulation_fusion(model)
    return model


def _linear_weights(model: GPTModel) -> int:
    per_layer = 5 if model.cfg.swiglu else 4   # QKV, output projection, (gate,) fc1, fc2
    return per_layer * len(model.layers)


def _steps(model: GPTModel, grads: GradBuffer, batches: list[list[torch.Tensor]], compiled: bool = False) -> list:
    """Each step's buffer (a copy) after its micro-batches' backward passes."""
    out = []
    for micro in batches:
        grads.zero_grad()
        for i, tokens in enumerate(micro):
            with contextlib.nullcontext() if i == len(micro) - 1 else grads.no_sync():
                model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        grads.finish_grad_sync()
        out.append(grads.grad_data.clone())
    return out


@fuzz(16)
@given(arch=st.sampled_from(["gpt", "llama"]), fused_functions=st.booleans(), micro=st.integers(1, 3),
       bf16=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_the_buffer_holds_what_the_hooks_would_have_added(arch, fused_functions, micro, bf16, seed):
    """Two steps of 1-3 micro-batches: with the fusion, every linear weight's gradient reaches the buffer through
    its GEMM (the hooks add nothing for them) and the buffer equals the one the hooks fill without it: to float64
    rounding in float64, bit for bit in bf16 (on the CPU the op does the hooks' arithmetic there: the product in
    bf16, added in fp32); a second step starts from zero again."""
    added: list = []
    accumulate = gb.accumulate
    g = torch.Generator().manual_seed(seed)
    batches = [[torch.randint(0, 64, (2, 9), generator=g) for _ in range(micro)] for _ in range(2)]
    dtype = torch.bfloat16 if bf16 else None
    with float64(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(gb, "accumulate", lambda dst, src, first: added.append(dst.data_ptr()) or
                   accumulate(dst, src, first))
        fused = _model(arch, fused_functions, fusion=True, dtype=dtype)
        plain = _model(arch, fused_functions, fusion=False, dtype=dtype)
        grads_f, grads_p = GradBuffer([fused], ParallelState()), GradBuffer([plain], ParallelState())
        assert len(grads_f.fused()) == _linear_weights(fused) and not grads_p.fused()
        got = _steps(fused, grads_f, batches)
        fused_ptrs = {p.main_grad.data_ptr() for p in grads_f.fused()}
        assert not fused_ptrs & set(added), "a fused weight's placeholder gradient was added"
        want = _steps(plain, grads_p, batches)
    for a, b in zip(got, want):
        assert a.abs().max() > 0 and a.dtype == (torch.float32 if bf16 else torch.float64)
        if bf16:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("arch,fused_functions,recompute", [("llama", False, None), ("gpt", True, None),
                                                            ("gpt", True, "full"), ("llama", False, "selective")])
def test_under_compile_one_graph_serves_every_layer_and_the_sums_hold(arch, fused_functions, recompute):
    """Per-layer compiled (AOT autograd: the op mutating the buffer traced as such), with the fused GeLU MLP and
    QKV functions or per linear, with and without recompute, two steps of two micro-batches: one graph, no graph
    break or recompile, and the eager fused buffer's sums."""
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randint(0, 64, (2, 9), generator=g) for _ in range(2)] for _ in range(2)]
    with float64():
        eager = _model(arch, fused_functions, fusion=True, layers=4, recompute_granularity=recompute)
        compiled = _model(arch, fused_functions, fusion=True, layers=4, recompute_granularity=recompute)
        want = _steps(eager, GradBuffer([eager], ParallelState()), batches)
        grads = GradBuffer([compiled], ParallelState())
        torch._dynamo.reset()
        counters.clear()
        compile_chunks([compiled], ParallelState(), "layer", backend="aot_eager")
        got = _steps(compiled, grads, batches)
        stats, breaks = dict(counters["stats"]), sum(counters["graph_break"].values())
        torch._dynamo.reset()
    assert breaks == 0 and stats["unique_graphs"] == 1, (breaks, stats)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_fp8_linears_and_the_embeddings_stay_with_the_hooks(arch):
    """FP8's GEMMs cannot add into an fp32 buffer: no FP8 linear is marked, while a linear FP8 cannot take (an
    MLP of 40 columns: not a multiple of 16) is, and the buffer is the hooks' bit for bit (bf16). Nor are the
    embedding (tied to the output head, so autograd sums two gradients) and the norms marked."""
    model = _model(arch, False, fusion=True, dtype=torch.bfloat16, fp8=True)
    assert not any(param_meta(p).fuses_wgrad for p in model.parameters())
    fused = _model(arch, False, fusion=True)
    marked = {n for n, p in fused.named_parameters() if param_meta(p).fuses_wgrad}
    assert len(marked) == _linear_weights(fused)
    assert all(n.endswith(".weight") and ".layers." in "." + n and "norm" not in n for n in marked), marked
    mixed, plain = (_model(arch, False, fusion=f, dtype=torch.bfloat16, fp8=True, ffn_hidden_size=40)
                    for f in (True, False))
    marked = {n.split(".")[-2] for n, p in mixed.named_parameters() if param_meta(p).fuses_wgrad}
    assert marked == ({"gate", "fc1", "fc2"} if arch == "llama" else {"fc1", "fc2"}), marked
    batches = [[torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(2)]]
    grads = GradBuffer([mixed], ParallelState())
    assert len(grads.fused()) == len(marked) * 2
    got, = _steps(mixed, grads, batches)
    want, = _steps(plain, GradBuffer([plain], ParallelState()), batches)
    assert torch.equal(got, want)


def test_a_gemm_function_set_later_takes_the_mark_away():
    """Marks belong to the GEMM function that set them: a linear given another function afterwards (here one
    that knows nothing of the buffer) loses its mark, so its hook adds its gradient again (none is dropped)."""
    g = torch.Generator().manual_seed(2)
    batches = [[torch.randint(0, 64, (2, 9), generator=g) for _ in range(2)]]
    with float64():
        fused, plain = _model("gpt", False, fusion=True), _model("gpt", False, fusion=False)
        fc1 = fused.layers["0"].mlp.fc1
        fc1.set_matmul(lambda x, w, b: torch.nn.functional.linear(x, w, b))
        assert not param_meta(fc1.weight).fuses_wgrad
        fused.layers["1"].mlp.set_fused(lambda x, w1, b1, w2: torch.nn.functional.linear(
            torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1), approximate=fused.cfg.gelu_approximation),
            w2))
        grads = GradBuffer([fused], ParallelState())
        assert len(grads.fused()) == _linear_weights(fused) - 3
        got, = _steps(fused, grads, batches)
        want, = _steps(plain, GradBuffer([plain], ParallelState()), batches)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_without_a_buffer_the_gradients_are_autograds():
    """Direct gradients (one micro-batch, DP 1: no `main_grad`): marked weights get autograd's real gradients."""
    model = _model("gpt", False, fusion=True)
    grads = GradBuffer([model], ParallelState(), micro_batches=1)
    assert grads.direct and not grads.fused()
    assert not any(accumulates_in_backward(p) for p in model.parameters())
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    grads.zero_grad()
    model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    grads.finish_grad_sync()
    w = model.layers["0"].mlp.fc1.weight
    ref = _model("gpt", False, fusion=False)
    ref(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    torch.testing.assert_close(grads._kept[w], ref.layers["0"].mlp.fc1.weight.grad, rtol=0, atol=0)


def test_a_run_trains_the_same_curve_with_and_without_it():
    """The trainer wiring: by default the linears' weights accumulate in backward (four a layer), and
    --no-gradient-accumulation-fusion leaves them all to the hooks; both train the same float64 curve."""
    from tests.support.curves import make_trainer, run_curve, tiny_config
    curves = {}
    with float64():
        for flag in (False, True):
            t = make_trainer(tiny_config(train_iters=3, no_gradient_accumulation_fusion=flag))
            assert len(t.grads.fused()) == (0 if flag else 4 * t.cfg.model.num_layers) and t.num_micro > 1
            curves[flag] = run_curve(t.cfg, trainer=t)
    a, b = curves[False], curves[True]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-12)
    assert a["norms"] == pytest.approx(b["norms"], rel=1e-12)
