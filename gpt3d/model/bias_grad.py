"""A biased GeLU MLP and a biased QKV linear whose bias gradients are summed in the passes that write their
gradients.

Why: in a compiled bf16 step two passes only re-read a tensor another kernel has just written: fc1's bias
gradient sums the GeLU gradient, and the QKV bias gradient sums the query/key/value gradients after Inductor
has copied them into the fused layout (benchmarks/RESULTS.md, 2026-12-06, session 36). Here one Triton pass
writes the GeLU gradient and its column sums, and one reads dq, dk, dv where attention's backward left them
and writes the fused gradient and its column sums (gpt3d/model/bias_grad_triton.py). The GEMMs are torch's,
each bias in its GEMM's epilogue; the functions plug into the model's fusion hooks (`MLP.set_fused`,
`SelfAttention.set_fused_qkv`), which keep the TP communication, fc2's bias and the parameters unchanged.

Training installs them (model/build.py, through `bias_grad_fusion_applies`) on CUDA in bf16 and fp16 where
the Triton kernels load: measured on one H100 (benchmarks/RESULTS.md, 2026-12-07, session 38).
`benchmarks/bias_grad_check.py` checks the kernels against the references and times the modules.

The gradient ops are custom ops: a torch reference (CPU, float64, and the spec the Triton kernels are checked
against by benchmarks/bias_grad_check.py) and the Triton kernels on CUDA.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..triton_kernels import triton_kernels
from . import cublaslt, quack_gemm
from .grad_accumulation import main_grad_of, weight_grad
from .attention import SelfAttention, split_qkv
from .fp8_qkv import assemble
from .gpt import MLP


def _sum_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _gelu_ref(da: torch.Tensor, h: torch.Tensor, tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    op = _sum_dtype(h)
    dh = torch.ops.aten.gelu_backward(da.to(op), h.to(op), approximate="tanh" if tanh else "none").to(h.dtype)
    return dh.contiguous(), dh.to(op).sum(0)   # row-major whatever the inputs' layout, as the kernel writes it


def _qkv_ref(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = assemble(dq, dk, dv)
    return g, g.to(_sum_dtype(dq)).sum(0)


@torch.library.custom_op("gpt3d::gelu_grad_sums", mutates_args=())
def gelu_grad_sums(da: torch.Tensor, h: torch.Tensor, tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(da * GeLU'(h) rounded to h's dtype, as autograd stores it; its column sums in fp32, or h's precision if
    higher), da and h [T, F]."""
    return _gelu_ref(da, h, tanh)


@gelu_grad_sums.register_fake
def _(da, h, tanh):
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(h.shape[1], dtype=_sum_dtype(h))


@torch.library.custom_op("gpt3d::qkv_grad_sums", mutates_args=())
def qkv_grad_sums(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(split_qkv's inverse of dq [T, heads, hd], dk and dv [T, kv, hd]: the fused gradient [T, (heads + 2 kv) hd];
    its column sums in fp32, or dq's precision if higher)."""
    return _qkv_ref(dq, dk, dv)


@qkv_grad_sums.register_fake
def _(dq, dk, dv):
    n = (dq.shape[1] + 2 * dk.shape[1]) * dq.shape[2]
    return dq.new_empty((dq.shape[0], n)), dq.new_empty(n, dtype=_sum_dtype(dq))


@torch.library.custom_op("gpt3d::gelu_grad_sums_mm", mutates_args=())
def gelu_grad_sums_mm(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu_grad_sums(dy @ w2, h, tanh) for the MLP's backward through model/cublaslt.py: on CUDA the fastest, timed
    once per shape, of cuBLASLt's GeLU-gradient epilogue then the sums, the tuned GEMM then the Triton pass
    (the epilogue measured faster at 1.3B and 2.7B, slower at 350M: RESULTS.md, 2026-12-07, session 39), and
    where quack-kernels loads its epilogue with the sums in it (model/quack_gemm.py; fastest at all three,
    session 41; its sums are of dh before dh's rounding)."""
    return _gelu_ref(dy @ w2, h, True)


@gelu_grad_sums_mm.register_fake
def _(dy, w2, h):
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(h.shape[1], dtype=_sum_dtype(h))


_GELU_GRAD_CHOICE: dict[tuple, int] = {}
QUACK_WAY = 2   # the index of quack's way (model/quack_gemm.py) in the MLP backward's ways


def _gelu_grad_sums_mm_cuda(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def epilogue():
        dh = cublaslt.lt_mm_dgelu(dy, w2, h)
        return dh, dh.sum(0, dtype=_sum_dtype(h))

    def separate():
        return gelu_grad_sums(cublaslt.lt_mm(dy, w2, None), h, True)
    quack = quack_gemm.applies(dy, w2, h)
    ways = [separate, epilogue]   # the first unless another times faster; quack's (QUACK_WAY) where it applies
    if quack:
        ways.append(lambda: quack_gemm.mm_dgelu_sums(dy, w2, h) or epilogue())
    return cublaslt.pick(_GELU_GRAD_CHOICE, gelu_grad_key(dy, w2, h, quack), ways)


def gelu_grad_key(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, quack: bool) -> tuple:
    """`_GELU_GRAD_CHOICE`'s key: what the ways' speed depends on, and whether quack's way is among them
    (`quack_gemm.applies`), which fixes how many there are."""
    return cublaslt.way_key(dy, w2, h) + (quack,)


def quack_problems() -> int:
    """How many GEMM problems of this process chose a quack-kernels way (model/quack_gemm.py): the forward GeLU
    GEMM's (cublaslt.GELU_QUACK_WAY) and the MLP backward's (QUACK_WAY). `gpt3d bench` reports it per row."""
    return (sum(v == cublaslt.GELU_QUACK_WAY for v in cublaslt.GELU_WAYS.values())
            + sum(v == QUACK_WAY for v in _GELU_GRAD_CHOICE.values()))


def _register_triton(k) -> bool:
    gelu_grad_sums_mm.register_kernel("cuda")(_gelu_grad_sums_mm_cuda)

    @gelu_grad_sums.register_kernel("cuda")
    def _(da, h, tanh):
        if h.dtype == torch.float64:   # the kernels compute in fp32
            return _gelu_ref(da, h, tanh)
        return k.gelu_grad_sums(da, h, tanh)

    @qkv_grad_sums.register_kernel("cuda")
    def _(dq, dk, dv):
        if dq.dtype == torch.float64:
            return _qkv_ref(dq, dk, dv)
        return k.qkv_grad_sums(dq, dk, dv)
    return True


_KERNELS = triton_kernels(".bias_grad_triton", __package__)
TRITON = _KERNELS is not None and _register_triton(_KERNELS)


def _mm(a: torch.Tensor, b: torch.Tensor, lt: bool, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b (+ bias) through model/cublaslt.py's op (`lt`) or torch's."""
    if lt:
        return cublaslt.lt_mm(a, b, bias)
    return a @ b if bias is None else torch.addmm(bias, a, b)


def _wgrad(dy: torch.Tensor, x: torch.Tensor, main_grad: Optional[torch.Tensor], lt: bool) -> torch.Tensor:
    """dy^T x, or added into the gradient buffer (model/grad_accumulation.py)."""
    return weight_grad(dy, x, main_grad, lambda a, b: _mm(a, b, lt))


class _MLP(torch.autograd.Function):
    """GeLU(x W1^T + b1) W2^T on [T, H] (fc2's bias stays with fc2); fc1's bias gradient summed in the GeLU
    gradient's pass; with `lt` and the tanh GeLU, the GeLU in a GEMM epilogue (cuBLASLt's or quack's, whichever
    is faster: model/cublaslt.py) and its gradient with fc1's bias sums likewise where that is faster
    (`gelu_grad_sums_mm`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                tanh: bool, lt: bool, g1: Optional[torch.Tensor],
                g2: Optional[torch.Tensor]) -> torch.Tensor:
        if lt and tanh:
            a, h = cublaslt.lt_mm_gelu(x, w1.t(), b1)
        else:
            h = _mm(x, w1.t(), lt, b1)
            a = F.gelu(h, approximate="tanh" if tanh else "none")
        ctx.save_for_backward(x, w1, w2, h, a)
        ctx.tanh, ctx.lt, ctx.b_dtype, ctx.main_grads = tanh, lt, b1.dtype, (g1, g2)
        return _mm(a, w2.t(), lt)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x, w1, w2, h, a = ctx.saved_tensors
        if ctx.lt and ctx.tanh:
            dh, db1 = gelu_grad_sums_mm(dy, w2, h)
        else:
            dh, db1 = gelu_grad_sums(_mm(dy, w2, ctx.lt), h, ctx.tanh)
        g1, g2 = ctx.main_grads
        return (_mm(dh, w1, ctx.lt), _wgrad(dh, x, g1, ctx.lt), db1.to(ctx.b_dtype),
                _wgrad(dy, a, g2, ctx.lt), None, None, None, None)


class _QKV(torch.autograd.Function):
    """q, k, v = split_qkv(x W^T + b) on [T, H], views of the GEMM's output; the bias gradient summed as the
    query/key/value gradients are assembled."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, kv: int, hd: int, lt: bool,
                main_grad: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x, w)
        ctx.b_dtype, ctx.lt, ctx.main_grad = b.dtype, lt, main_grad
        return split_qkv(_mm(x, w.t(), lt, b), kv, hd)

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple:
        x, w = ctx.saved_tensors
        g, db = qkv_grad_sums(dq, dk, dv)
        return _mm(g, w, ctx.lt), _wgrad(g, x, ctx.main_grad, ctx.lt), db.to(ctx.b_dtype), None, None, None, None


class FusedGeluMLP:
    """`MLP.set_fused`'s function for a biased GeLU MLP: `mlp(x, fc1.weight, fc1.bias, fc2.weight)`; `lt`: its
    GEMMs through model/cublaslt.py."""

    fuses_wgrad = True   # model/grad_accumulation.py

    def __init__(self, tanh: bool, lt: bool = False):
        self.tanh, self.lt = tanh, lt

    def __call__(self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        y = _MLP.apply(x.reshape(-1, x.shape[-1]), w1, b1, w2, self.tanh, self.lt, main_grad_of(w1),
                       main_grad_of(w2))
        return y.reshape(*x.shape[:-1], w2.shape[0])


class FusedQKV:
    """`SelfAttention.set_fused_qkv`'s function for a biased QKV linear; `lt` as FusedGeluMLP's."""

    fuses_wgrad = True   # model/grad_accumulation.py

    def __init__(self, lt: bool = False):
        self.lt = lt

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, kv: int,
                 hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _QKV.apply(x.reshape(-1, x.shape[-1]), w, b, kv, hd, self.lt, main_grad_of(w))


def bias_grad_fusion_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether training installs the functions (unless --no-bias-grad-fusion): where their Triton kernels run
    (CUDA, Triton loaded) and the parameters are bf16 or fp16, the dtypes the kernels are checked in (bf16
    timed); elsewhere the references would only add passes."""
    return device.type == "cuda" and TRITON and dtype in (torch.bfloat16, torch.float16)


def enable_bias_grad_fusion(model: nn.Module, lt: bool = False) -> int:
    """Give every biased GeLU MLP and biased QKV linear of `model` whose linears run torch's own GEMMs (not
    FP8's: model/fp8.py, which must come first) and that has no fused function yet the functions above; returns
    how many. The references compute autograd's gradients; on CUDA the Triton kernels give the QKV ones exactly and
    the GeLU one up to its last bits (Triton's erf/exp against torch's)."""
    n = 0
    for m in model.modules():
        if (isinstance(m, MLP) and not m.swiglu and m.fc1.bias is not None and m._fused is None
                and m.fc1._matmul is None and m.fc2._matmul is None):
            m.set_fused(FusedGeluMLP(m.gelu_approximation == "tanh", lt))
            n += 1
        elif (isinstance(m, SelfAttention) and m.qkv.bias is not None and m._fused_qkv is None
              and m.qkv._matmul is None):
            m.set_fused_qkv(FusedQKV(lt))
            n += 1
    return n
