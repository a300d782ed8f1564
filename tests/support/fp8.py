"""FP8 test helpers shared by the fused-function tests (gpt3d/model/fp8_mlp.py, fp8_qkv.py)."""
from __future__ import annotations

import torch

from gpt3d.model import fp8_mlp
from gpt3d.model.fp8 import enable_fp8
from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState


def exact_quantization(monkeypatch):
    """Make the FP8 functions' quantization exact (float64 casts, power-of-two scales, float64 GEMMs);
    returns the GEMM calls' (fast accumulation, out dtype) as they happen."""
    # a power of two per tensor, from its amax: exact in float64, and a scale paired with the wrong GEMM
    # operand shows
    monkeypatch.setattr(fp8_mlp, "to_scale",
                        lambda amax, dtype: torch.exp2(-torch.floor(torch.log2(amax.double().clamp(min=2 ** -20)))))
    monkeypatch.setattr(fp8_mlp, "quantize", lambda t, scale, dtype: t.to(torch.float64) * scale)

    calls = []

    def mm(a, b, inv_a, inv_b, out_dtype, fast, bias=None):
        # _scaled_mm's layouts: a row-major, b column-major (a wrong copy would compute the same values)
        assert a.is_contiguous() and b.t().is_contiguous(), (a.stride(), b.stride())
        calls.append((fast, out_dtype))
        y = (a @ b) * inv_a * inv_b
        return y if bias is None else y + bias
    monkeypatch.setattr(fp8_mlp, "scaled_mm", mm)
    return calls


def scaled_leaves(g: torch.Generator):
    """rand(*shape): float64 leaf tensors (requiring grad), each drawn at its own magnitude (2^-6, 2^-4, ...,
    up to seven tensors), so each gets its own scale and a scale paired with the wrong operand shows."""
    exponent = iter(range(-6, 7, 2))

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2.0 ** next(exponent)).requires_grad_()
    return rand


def assert_same(got, want) -> None:
    """Pairwise: equal shapes and values equal up to float64 rounding (float64 autograd against float64
    autograd, the operations in another order): within 1e-12 of each tensor's largest element, since an element
    that sums large terms to near zero keeps their rounding (CI found 3e-12 on one such element of a tensor
    reaching 7e3). A wrong formula moves elements by their own size."""
    for a, e in zip(got, want, strict=True):
        assert a.shape == e.shape
        scale = max(1.0, float(e.detach().abs().max())) if e.numel() else 1.0
        torch.testing.assert_close(a.detach(), e.detach(), rtol=1e-12, atol=1e-12 * scale)


def bytes_(t):
    return t.view(torch.uint8)


def torchao_cast(t, dtype, scale=None):
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig, hp_tensor_and_scale_to_float8
    if scale is None:
        return hp_tensor_to_float8_dynamic(t, dtype, LinearMMConfig(), gemm_input_role=GemmInputRole.INPUT)
    return hp_tensor_and_scale_to_float8(t, scale, dtype, LinearMMConfig(), GemmInputRole.INPUT)


def fp8_model(cfg, **fused) -> GPTModel:
    """A one-process bf16 GPT with emulated tensorwise FP8 GEMMs; `fused` picks enable_fp8's fused functions."""
    ps = ParallelState()
    m = GPTModel(cfg.model, ps, seed_everything(3, ps), vocab_size=250)
    m.init_weights(11)
    enable_fp8(m, "tensorwise", ps.device, emulate=True, **fused)
    return m.cast_parameters(torch.bfloat16)


def step(m, tokens) -> tuple[torch.Tensor, dict]:
    """(loss, every parameter's gradient in fp32) of one forward + backward."""
    m.zero_grad()
    loss = m(tokens, tokens).float().mean()
    loss.backward()
    return loss.detach(), {k: p.grad.float().clone() for k, p in m.named_parameters()}


def assert_trains_like(cfg, model) -> None:
    """One forward + backward of `model(cfg, fused=True)` against `model(cfg, fused=False)` on the same tokens:
    the loss within 1% and every gradient at cosine similarity above 0.99 (FP8's rounding, not a wrong layout)."""
    tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(0))
    l0, g0 = step(model(cfg, fused=False), tokens)
    l1, g1 = step(model(cfg, fused=True), tokens)
    assert abs(float(l1 - l0)) < 1e-2 * float(l0)
    for k in g0:
        cos = torch.nn.functional.cosine_similarity(g0[k].flatten(), g1[k].flatten(), dim=0)
        assert cos > 0.99, k


def count_paths(monkeypatch, function, fused) -> dict:
    """From now on, counts calls of the autograd Function `function` ("fused") and of each fused callable's
    per-linear `fallback` ("fallback") in `fused`; returns the live counts."""
    seen = {"fused": 0, "fallback": 0}
    real_apply = function.apply

    def apply(*a):
        seen["fused"] += 1
        return real_apply(*a)
    monkeypatch.setattr(function, "apply", apply)
    for f in fused:
        def fallback(*a, _f=f.fallback):
            seen["fallback"] += 1
            return _f(*a)
        monkeypatch.setattr(f, "fallback", fallback)
    return seen


def batch_of(tokens: int) -> torch.Tensor:
    """`tokens` tokens in all: two sequences where the count is even, else one."""
    return torch.randint(0, 250, (2, tokens // 2) if tokens % 2 == 0 else (1, tokens),
                         generator=torch.Generator().manual_seed(0))
