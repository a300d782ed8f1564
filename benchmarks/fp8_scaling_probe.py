"""Probe (benchmarks only, never the trainer): would other tensorwise FP8 scaling schemes make Inductor's casts
cheaper? `benchmarks/profile_step.py` options fp8o / fp8r / fp8d / fp8dr install it in place of gpt3d's FP8
GEMMs (gpt3d/model/fp8.py), one instance per linear so each holds its own amaxes.

Every variant casts input, weight and output gradient itself and hands torchao's matmul the FP8 tensors:
- `rowamax`: the amax is a max per row and then over the rows, instead of one flat max, a shape Inductor can
  fuse with the row's other work (a flat max over the whole tensor is a split reduction of its own);
- `delayed`: the scale comes from the previous call's amax (Transformer Engine's delayed scaling with a
  history of one call, the first call scaled from its own amax), so the cast need not wait for this tensor's
  amax and both can be one pass. The scales then differ from torchao's, so it is a speed probe only: no
  saved state, no step-boundary update, recompute would see other scales.
Without `delayed` the casts give torchao's bits (a max is exact in any order).
Measured on one H100 (benchmarks/RESULTS.md, 2026-12-06): none is worth carrying.
"""
from __future__ import annotations

from typing import Any

import torch
from torchao.float8.float8_training_tensor import GemmInputRole, hp_tensor_and_scale_to_float8
from torchao.float8.float8_utils import amax_to_scale

from gpt3d.model import fp8 as gpt3d_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def amax(t: torch.Tensor, rowamax: bool) -> torch.Tensor:
    t = t.detach()
    if rowamax:
        return t.reshape(-1, t.shape[-1]).abs().amax(dim=-1).max().float()
    return t.abs().max().float()


class _CastGradient(torch.autograd.Function):
    """Identity forward; backward casts the output gradient to E5M2 for torchao's backward GEMMs. The amax
    buffer goes in as an input and is saved for backward: AOTAutograd keeps such a backward mutation."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, last_amax: torch.Tensor, primed: bool, mm_config: Any, delayed: bool,
                rowamax: bool) -> torch.Tensor:
        ctx.save_for_backward(last_amax)
        ctx.primed, ctx.mm_config, ctx.delayed, ctx.rowamax = primed, mm_config, delayed, rowamax
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        last_amax, = ctx.saved_tensors
        now = amax(g, ctx.rowamax)
        scale = amax_to_scale(last_amax if ctx.primed and ctx.delayed else now, E5M2)
        g8 = hp_tensor_and_scale_to_float8(g, scale, E5M2, ctx.mm_config, GemmInputRole.GRAD_OUTPUT)
        if ctx.delayed:
            last_amax.copy_(now)
        return g8, None, None, None, None, None


class ProbeMatmul(gpt3d_fp8.Float8Matmul):
    def __init__(self, device: torch.device, emulate: bool, delayed: bool, rowamax: bool):
        super().__init__("tensorwise", emulate)
        # made before compiling: a tensor first made inside a compiled call cannot be mutated by later ones
        self.last_amax = [torch.zeros((), device=device) for _ in range(3)]   # input, weight, output gradient
        self.primed = False
        self.delayed, self.rowamax = delayed, rowamax

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
        ax, aw = amax(x, self.rowamax), amax(weight, self.rowamax)
        old = self.primed and self.delayed
        sx = amax_to_scale(self.last_amax[0] if old else ax, E4M3)
        sw = amax_to_scale(self.last_amax[1] if old else aw, E4M3)
        x8 = hp_tensor_and_scale_to_float8(x, sx, E4M3, self.mm_config, GemmInputRole.INPUT)
        w8 = hp_tensor_and_scale_to_float8(weight.t(), sw, E4M3, self.mm_config, GemmInputRole.WEIGHT)
        if self.delayed:
            with torch.no_grad():
                self.last_amax[0].copy_(ax)
                self.last_amax[1].copy_(aw)
        y = self._fn.apply(x8, w8, self.mm_config, self.config)
        y = _CastGradient.apply(y, self.last_amax[2], self.primed, self.mm_config, self.delayed, self.rowamax)
        self.primed = True
        return y if bias is None else y + bias.to(y.dtype)


def install(delayed: bool, rowamax: bool) -> None:
    """Make build_model_chunks route the linears gpt3d's enable_fp8 picks (its checks and its multiple-of-16
    rule) through a ProbeMatmul each instead of gpt3d's shared Float8Matmul."""
    import gpt3d.model.build as build

    def enable_fp8(model: torch.nn.Module, recipe: str, device: torch.device, emulate: bool = False) -> int:
        n = gpt3d_fp8.enable_fp8(model, recipe, device, emulate, fused_mlp=False)   # every GEMM a probe
        for m in model.modules():
            if isinstance(getattr(m, "_matmul", None), gpt3d_fp8.Float8Matmul):
                m.set_matmul(ProbeMatmul(device, emulate, delayed, rowamax))
        return n
    build.enable_fp8 = enable_fp8   # type: ignore[assignment]   # build_model_chunks calls it by this name
