"""FP8 GEMMs for the transformer layers' linears, through torchao's float8 training (`pip install -e ".[fp8]"`).

Why here and not a module swap: torchao's `convert_to_float8_training` replaces
nn.Linear modules, and gpt3d's linears are its own TP layers whose parameter
names and shards the checkpoints, ZeRO buckets and TP tests rely on. So only the
GEMM is swapped (`set_matmul` in gpt3d/parallel/layers.py): the weights stay
bf16 parameters with the same names, each forward casts input and weight to
float8 with dynamic scales (E4M3), the backward casts the output gradient
(E5M2 for `tensorwise`, E4M3 for the rowwise recipes) the way Transformer Engine
and torchao do, and master weights, optimizer and checkpoints never see FP8. A
checkpoint written with --fp8 therefore resumes without it and vice versa.
The output head (vocabulary projection) stays bf16, as in torchao's and
Megatron's recipes. Under torch.compile the casts fuse with their neighbours.
With `tensorwise` scaling the backward's casts of the input and the weight would give the very bits the
forward's did (one scale per tensor, whatever the layout), so the forward casts them once and hands torchao
the FP8 tensors: backward reuses them (a transpose of FP8 bytes instead of another amax and cast of bf16).
What backward keeps is then FP8 input and weight copies rather than the bf16 input and a view of the weight;
compiled, Inductor's partitioner decides what is kept either way (peak memory measured the same). The
rowwise recipes scale the backward's copies along the other axis, so they cast inside torchao's function.
Where a step would cast a weight more than once, the train step casts it once for the step instead
(gpt3d/model/fp8_weights.py); `__call__` and the functions below then take that copy.
With `tensorwise` a GeLU MLP's linears run as one FP8 function instead (gpt3d/model/fp8_mlp.py, same recipe),
whose casts between the GEMMs are Triton kernels, faster there than Inductor's (a SwiGLU MLP's: where
quack-kernels gives its backward an epilogue), and the attention's QKV linear as one function returning q, k
and v (gpt3d/model/fp8_qkv.py), whose output gradient is cast where attention's backward leaves it.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from .attention import SelfAttention
from . import fp8_mlp
from .gpt import MLP

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


def check_fp8_supported(device: torch.device) -> None:
    """One clear line instead of a kernel error deep inside the first step."""
    if device.type != "cuda":
        raise ConfigError(f"--fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+, e.g. "
                          f"H100); this run is on {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ConfigError(f"--fp8 needs FP8 tensor cores (compute capability 8.9+, e.g. H100); "
                          f"{torch.cuda.get_device_name(device)} has {major}.{minor}")


class Float8Matmul:
    """`matmul(x, weight, bias)` = F.linear with both GEMM operands cast to float8 (dynamic scaling)."""

    def __init__(self, recipe: str, emulate: bool = False):
        from ..console.quiet import quiet_imports
        try:
            with quiet_imports():   # torchao logs a line per CUDA extension it cannot load here
                import torchao.float8  # noqa: F401
            from torchao.float8 import Float8LinearConfig
            from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
            from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
            from torchao.float8.float8_training_tensor import (Float8TrainingTensor, GemmInputRole, LinearMMConfig,
                                                               ScaledMMConfig)
            from torchao.float8.config import ScalingGranularity, ScalingType
        except ImportError:
            raise ConfigError("--fp8 needs torchao's float8 training: pip install -e \".[fp8]\"") from None
        if recipe not in RECIPES:
            raise ConfigError(f"unknown --fp8-recipe '{recipe}' (choose from {', '.join(RECIPES)})")
        c = Float8LinearConfig.from_recipe_name(recipe)
        if emulate:   # CPU tests: same casts and scales, the GEMM emulated in high precision
            c = dataclasses.replace(c, emulate=True)
        self.config = c
        self.mm_config = LinearMMConfig(*(ScaledMMConfig(c.emulate, g.use_fast_accum, False, c.pad_inner_dim)
                                          for g in (c.gemm_config_output, c.gemm_config_grad_input,
                                                    c.gemm_config_grad_weight)))
        self._fn = matmul_with_hp_or_float8_args
        # torchao's config already requires each operand's two casts to share a dtype
        casts = [getattr(c, f"cast_config_{n}") for n in ("input", "input_for_grad_weight", "weight",
                                                          "weight_for_grad_input")]
        # (cast input, cast weight) as torchao's forward would, for its backward to reuse; None: torchao casts
        self._cast_once: Optional[tuple[Callable, Callable]] = None
        self._held = (Float8TrainingTensor, GemmInputRole.WEIGHT)   # for weights cast once a step
        if all(k.scaling_type is ScalingType.DYNAMIC and k.scaling_granularity is ScalingGranularity.TENSORWISE
               for k in casts):
            cast = functools.partial(hp_tensor_to_float8_dynamic, linear_mm_config=self.mm_config,
                                     round_scales_to_power_of_2=c.round_scales_to_power_of_2)
            self._cast_once = (
                functools.partial(cast, float8_dtype=c.cast_config_input.target_dtype,
                                  gemm_input_role=GemmInputRole.INPUT),
                functools.partial(cast, float8_dtype=c.cast_config_weight.target_dtype,
                                  gemm_input_role=GemmInputRole.WEIGHT))

    @property
    def casts_once(self) -> bool:
        """Whether input and weight are cast once in forward for the backward too (dynamic tensorwise scales):
        then a weight's cast is `fp8_mlp.cast(weight, E4M3)`'s bits, which the fused functions and
        model/fp8_weights.py use as well."""
        w = self.config.cast_config_weight
        return (self._cast_once is not None and w.target_dtype == torch.float8_e4m3fn
                and not self.config.round_scales_to_power_of_2)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
        w = weight.t()
        if self._cast_once is not None:
            cast_x, cast_w = self._cast_once
            held = fp8_mlp.held_cast(weight)   # cast once for the step (model/fp8_weights.py)
            x = cast_x(x)
            w = cast_w(w) if held is None else _HeldCast.apply(w, held.data.t(), held.scale, self.mm_config,
                                                               *self._held)
        y = self._fn.apply(x, w, self.mm_config, self.config)   # [*, in] @ [in, out] -> [*, out]
        return y if bias is None else y + bias.to(y.dtype)


class _HeldCast(torch.autograd.Function):
    """A weight's FP8 copy cast for the step (model/fp8_weights.py) as the tensor torchao's function takes, its
    gradient passed to the weight unchanged, as torchao's own cast passes it."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, mm_config, tensor_type,
                role) -> torch.Tensor:
        return tensor_type(data, scale, w.dtype, mm_config, role)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None, None, None, None, None


def fp8_eligible(out_features: int, in_features: int) -> bool:
    """Whether a linear with these (TP-local) dimensions runs FP8 GEMMs: both multiples of 16, as `_scaled_mm`
    needs. The one rule for enable_fp8 and the planner's time model (gpt3d/plan/timing.py)."""
    return out_features % 16 == 0 and in_features % 16 == 0


def uses_fp8(model: nn.Module) -> bool:
    """Whether any linear of `model` runs FP8 GEMMs (enable_fp8 was applied)."""
    return any(isinstance(getattr(m, "_matmul", None), Float8Matmul) for m in model.modules())


def enable_fp8(model: nn.Module, recipe: str, device: torch.device, emulate: bool = False,
               fused_mlp: bool = True, fused_swiglu: Optional[bool] = None, fused_qkv: bool = True) -> int:
    """Route every TP linear of `model` whose (local) dims suit FP8 GEMMs (multiples of 16) through float8;
    returns how many. The output head is not a TP linear and stays bf16. With `tensorwise` scaling a GeLU
    MLP whose linears all switched runs as one FP8 function (gpt3d/model/fp8_mlp.py: the same recipe, its
    casts in fewer passes) unless `fused_mlp` is False (benchmarks compare the two). A SwiGLU MLP does so
    where `fused_swiglu` says, by default where its backward takes the epilogue (`fp8_mlp.dgrad_epilogue_loads`
    and `epilogue_takes`: no biases; +1.7% a Llama 4x1 step on one H100); without it the function measured no
    faster than per linear (Inductor's casts run at ~1.7 TB/s there; benchmarks/RESULTS.md, sessions 29 and 47).
    Likewise the attention's QKV linear, unless `fused_qkv` is False, runs as one function handing back q, k and
    v (gpt3d/model/fp8_qkv.py) where its head dim is a multiple of 16."""
    if not emulate:
        check_fp8_supported(device)
    for m in model.modules():   # one set first would keep its GEMMs where no FP8 function replaces it
        if isinstance(m, (MLP, SelfAttention)) and m.fused_linears():
            raise RuntimeError(f"enable_fp8 must come before other fused functions ({type(m).__name__} has one)")
    matmul = Float8Matmul(recipe, emulate)
    n = 0
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            if fp8_eligible(*m.weight.shape):
                m.set_matmul(matmul)
                n += 1
    # the functions: tensorwise; not where FP8 is emulated on a GPU without FP8 GEMMs (they call _scaled_mm
    # themselves; the CPU has one, which the tests use)
    functions = matmul.casts_once and (not emulate or device.type == "cpu")
    # asked only where a SwiGLU MLP could take it: the answer imports quack (~11 s)
    epilogue = fused_mlp and functions and fused_swiglu is not False and \
        any(isinstance(m, MLP) and m.swiglu for m in model.modules()) and fp8_mlp.dgrad_epilogue_loads(device)
    if fused_mlp and functions:
        for m in model.modules():
            if not isinstance(m, MLP) or not all(x._matmul is matmul for x in
                                                 (m.fc1, m.fc2) + ((m.gate,) if m.swiglu else ())):
                continue
            # by default a SwiGLU MLP runs as the function where its backward takes the epilogue
            takes = m.swiglu and epilogue and fp8_mlp.epilogue_takes(m.gate.bias is not None or m.fc1.bias is not None,
                                                                     _fast(matmul.config)[1])
            if not m.swiglu or (takes if fused_swiglu is None else fused_swiglu):
                m.set_fused(_fused_mlp(matmul, m.swiglu, m.gelu_approximation, m.swiglu and epilogue))
    if fused_qkv and functions:
        from .fp8_qkv import Float8QKV
        for m in model.modules():
            if isinstance(m, SelfAttention) and m.qkv._matmul is matmul and m.head_dim % 16 == 0:
                m.set_fused_qkv(Float8QKV(_fast(matmul.config), matmul))
    return n


def _fast(c) -> tuple[bool, bool, bool]:
    """torchao's fast-accumulation choice for the forward, input-gradient and weight-gradient GEMMs."""
    return (c.gemm_config_output.use_fast_accum, c.gemm_config_grad_input.use_fast_accum,
            c.gemm_config_grad_weight.use_fast_accum)


def _fused_mlp(matmul: Float8Matmul, swiglu: bool, approximate: str, epilogue: bool):
    def per_linear(x, *w):
        if swiglu:
            wg, bg, w1, b1, w2 = w
            return matmul(F.silu(matmul(x, wg, bg)) * matmul(x, w1, b1), w2, None)
        w1, b1, w2 = w
        return matmul(F.gelu(matmul(x, w1, b1), approximate=approximate), w2, None)
    return fp8_mlp.Float8MLP(swiglu, approximate == "tanh", _fast(matmul.config), per_linear,
                             epilogue=epilogue)
