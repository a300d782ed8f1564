"""--fp8: refused in one line where it cannot run; where it runs, only the GEMMs change (emulated on CPU).

torchao's float8 training emulates the scaled GEMMs on CPU (same casts and scales, high-precision
products), which is enough to check the plumbing: which layers switch, that parameter names, shapes and
dtypes (hence checkpoints) do not change, that the loss and gradients stay close to the plain model's, and
that TP-sharded linears and recompute work with it. Speed is measured on the GPU (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

from tests.support.fuzz import fuzz

from gpt3d.config import ParallelConfig
from gpt3d.errors import ConfigError
from gpt3d.model.attention import SelfAttention
from gpt3d.model import fp8_mlp
from gpt3d.model.fp8 import RECIPES, Float8Matmul, enable_fp8
from gpt3d.model.gpt import MLP, GPTModel
from gpt3d.parallel.layers import ColumnParallelLinear, RowParallelLinear
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState, build_parallel_state

from tests.support import distributed
from tests.support.curves import tiny_config

GPT = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=250)
LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, seq_length=32,
             vocab_size=250, swiglu=True, ffn_hidden_size=128, use_rotary_position_embeddings=True,
             normalization="rmsnorm", disable_bias_linear=True, untie_embeddings_and_output_weights=True)


def _model(cfg, ps, fp8: bool):
    m = GPTModel(cfg.model, ps, seed_everything(3, ps), vocab_size=250)
    m.init_weights(11)
    n = enable_fp8(m, "tensorwise", ps.device, emulate=True, fused_swiglu=True) if fp8 else 0   # SwiGLU's too
    return m, n


def _loss_and_grads(m, tokens):
    m.zero_grad()
    loss = m(tokens, tokens).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_fp8_refused_on_cpu_in_one_line():
    r = subprocess.run([sys.executable, "-m", "gpt3d", "train", "--config", "configs/tiny.yaml", "--bf16", "--fp8",
                        "--device", "cpu", "--train-iters", "1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "gpt3d: error: --fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100); "
        "this run is on cpu"]


def test_fp8_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    """An A100 (8.0) is refused in one line naming the card; an H100 (9.0) passes the check."""
    from gpt3d.model.fp8 import check_fp8_supported
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    with pytest.raises(ConfigError, match=r"^--fp8 needs FP8 tensor cores .*NVIDIA A100-SXM4-80GB has 8\.0$"):
        check_fp8_supported(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    check_fp8_supported(torch.device("cuda"))


def test_fp8_needs_bf16():
    with pytest.raises(ConfigError, match="--fp8 needs --bf16"):
        tiny_config(fp8=True).validate(1)
    tiny_config(fp8=True, bf16=True).validate(1)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_fp8_swaps_the_gemms_not_the_parameters(arch):
    cfg = tiny_config(**(LLAMA if arch == "llama" else dict(num_layers=2, hidden_size=64, num_attention_heads=4,
                                                             seq_length=32, vocab_size=250)))
    ps = ParallelState()
    plain, _ = _model(cfg, ps, fp8=False)
    fp8, n = _model(cfg, ps, fp8=True)
    per_layer = 5 if arch == "llama" else 4           # qkv, proj, fc1 (+ gate), fc2; not the output head
    assert n == per_layer * cfg.model.num_layers
    linears = [m for m in fp8.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert all(m._matmul is not None for m in linears)
    sd_plain, sd_fp8 = plain.state_dict(), fp8.state_dict()   # a checkpoint is the same either way
    assert [(k, v.shape, v.dtype) for k, v in sd_plain.items()] == [(k, v.shape, v.dtype) for k, v in sd_fp8.items()]
    assert all(torch.equal(sd_plain[k], sd_fp8[k]) for k in sd_plain)
    tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(0))
    l0, g0 = _loss_and_grads(plain, tokens)
    l1, g1 = _loss_and_grads(fp8, tokens)
    assert not torch.equal(l0, l1)                          # the casts really happen
    assert float((l1 - l0).abs()) < 2e-2 * float(l0)
    for k in g0:
        assert _cos(g0[k], g1[k]) > 0.98, k


@pytest.mark.parametrize("arch", ["gpt", "llama"])   # the MLP as one FP8 function (model/fp8_mlp.py), GeLU/SwiGLU
def test_fp8_with_recompute_gives_the_same_step(arch):
    """Full recompute replays the forward inside backward: the dynamic FP8 scales are recomputed identically."""
    ps = ParallelState()
    shape = LLAMA if arch == "llama" else GPT
    cfg = tiny_config(**shape)
    a, _ = _model(cfg, ps, fp8=True)
    cfg_r = tiny_config(**shape, recompute_granularity="full")
    b, _ = _model(cfg_r, ps, fp8=True)
    tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(1))
    la, ga = _loss_and_grads(a, tokens)
    lb, gb = _loss_and_grads(b, tokens)
    assert torch.equal(la, lb)
    assert all(torch.allclose(ga[k], gb[k], atol=1e-6, rtol=1e-5) for k in ga)


ARCH = {"gpt": GPT, "llama": LLAMA, "swiglu+bias": dict(LLAMA, disable_bias_linear=False)}


def _tp_fp8(rank: int, world: int, arch: str = "llama", sp: bool = False, epilogue: bool = False) -> dict:
    cfg = tiny_config(**ARCH[arch])
    ps = build_parallel_state(ParallelConfig(tensor_model_parallel_size=world, sequence_parallel=sp), world, rank,
                              torch.device("cpu"))
    seen = []
    if epilogue:   # the SwiGLU backward through swiglu_dgrad + cast_pair (their references), as where quack loads
        fp8_mlp.dgrad_epilogue_loads = lambda device: True
        real = fp8_mlp.swiglu_dgrad
        fp8_mlp.swiglu_dgrad = lambda *a: seen.append(1) or real(*a)
    m, n = _model(cfg, ps, fp8=True)
    tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(2))
    loss, grads = _loss_and_grads(m, tokens)
    fused = all(mlp._fused is not None for mlp in m.modules() if isinstance(mlp, MLP)) and all(
        a._fused_qkv is not None for a in m.modules() if isinstance(a, SelfAttention))   # QKV's function too
    assert len(seen) == (cfg.model.num_layers if epilogue else 0)
    mlp = {k: grads[f"layers.0.mlp.{k}"] for k in MLP_GRADS if f"layers.0.mlp.{k}" in grads}
    return {"loss": float(loss), "swapped": n, "qkv_grad": grads["layers.0.attention.qkv.weight"], "fused": fused,
            "mlp": mlp}


MLP_GRADS = {"fc1.weight": 0, "fc2.weight": 1, "gate.weight": 0, "fc1.bias": 0, "gate.bias": 0}   # split dims


@pytest.mark.parametrize("arch,sp,epilogue", [("llama", False, False), ("llama", True, False), ("gpt", False, False),
                                              ("gpt", True, False), ("swiglu+bias", True, False),
                                              ("llama", True, True)])
def test_fp8_with_tensor_parallel_sharded_linears(arch, sp, epilogue):
    """TP=2: each rank's sharded linears run FP8 GEMMs; loss and gradients match one process within FP8's error.
    The MLP (GeLU or SwiGLU) runs as one FP8 function on each rank's shards, the TP layers' communication
    around it (with sequence parallelism: the all-gather before fc1 and the reduce-scatter after fc2); also
    with SwiGLU's backward through the dgrad epilogue's ops, as on a GPU where quack loads."""
    out = distributed.run(2, _tp_fp8, arch, sp, epilogue)
    ps = ParallelState()
    ref, _ = _model(tiny_config(**ARCH[arch]), ps, fp8=True)
    tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(2))
    loss, grads = _loss_and_grads(ref, tokens)
    assert [o["swapped"] for o in out] == ([8, 8] if arch == "gpt" else [10, 10])
    assert [o["fused"] for o in out] == [True, True]
    for o in out:
        assert abs(o["loss"] - float(loss)) < 1e-2 * float(loss)
    full = torch.cat([o["qkv_grad"] for o in out], dim=0)   # column-parallel: rows split across ranks
    assert _cos(full, grads["layers.0.attention.qkv.weight"]) > 0.98
    names = [k for k in MLP_GRADS if f"layers.0.mlp.{k}" in grads]
    assert len(names) == {"gpt": 3, "llama": 3, "swiglu+bias": 5}[arch]
    for name in names:   # column- / row-parallel shards
        dim = MLP_GRADS[name]
        assert _cos(torch.cat([o["mlp"][name] for o in out], dim=dim), grads[f"layers.0.mlp.{name}"]) > 0.98


def _step_and_kept(fn, x0, w0, dy):
    """fn(x, w)'s output and gradients, and the tensors autograd keeps for backward."""
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    kept: list = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = fn(x, w)
    y.backward(dy)
    return (y, x.grad, w.grad), kept


def _torchao_matmul(mm):
    """torchao's own function on the bf16 tensors: it casts them again in backward."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    return lambda x, w: matmul_with_hp_or_float8_args.apply(x, w.t(), mm.mm_config, mm.config)


@fuzz(25)
@given(rows=st.integers(1, 24), k=st.integers(1, 48), n=st.integers(1, 40), spread=st.sampled_from([1e-3, 1.0, 3e3]),
       seed=st.integers(0, 2 ** 31 - 1), transposed=st.booleans())
def test_the_forward_casts_serve_the_backward_bit_for_bit(rows, k, n, spread, seed, transposed):
    """With tensorwise scales the backward's FP8 copies of input and weight are the forward's bits, so gpt3d
    casts them once: output and both gradients equal torchao's own function (which casts them again in
    backward) bit for bit, also for a transposed input (the [s, b, h] -> [b, s, h] layouts attention and
    sequence parallelism hand over), and backward keeps the two FP8 tensors instead of the bf16 ones.
    Fails if the early casts use another dtype, role or scale than torchao's, or if gpt3d stops casting once."""
    from torchao.float8.float8_training_tensor import Float8TrainingTensor
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.randn(rows, 2, k, generator=g) * spread).to(torch.bfloat16)
    x0 = x0.transpose(0, 1) if transposed else x0.reshape(2, rows, k)
    w0 = (torch.randn(n, k, generator=g) * spread).to(torch.bfloat16)
    dy = (torch.randn(2, rows, n, generator=g) / spread).to(torch.bfloat16)
    mm = Float8Matmul("tensorwise", emulate=True)
    got, kept = _step_and_kept(mm, x0, w0, dy)
    want, _ = _step_and_kept(_torchao_matmul(mm), x0, w0, dy)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(kept) == 2 and all(isinstance(t, Float8TrainingTensor) for t in kept)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "tensorwise"])
def test_rowwise_recipes_cast_inside_torchao(recipe):
    """The rowwise recipes scale the backward's copies along the other axis, so gpt3d leaves every cast to
    torchao's function: the same results, and backward keeps the high-precision tensors, not FP8 ones."""
    from torchao.float8.float8_training_tensor import Float8TrainingTensor
    g = torch.Generator().manual_seed(5)
    x0, w0 = torch.randn(2, 16, 32, generator=g).to(torch.bfloat16), torch.randn(48, 32, generator=g).to(torch.bfloat16)
    dy = torch.randn(2, 16, 48, generator=g).to(torch.bfloat16)
    mm = Float8Matmul(recipe, emulate=True)
    got, kept = _step_and_kept(mm, x0, w0, dy)
    want, _ = _step_and_kept(_torchao_matmul(mm), x0, w0, dy)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert kept and not any(isinstance(t, Float8TrainingTensor) for t in kept)
