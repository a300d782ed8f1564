"""GEMMs through cuBLASLt with the fastest of its candidate algorithms for each problem, and the tanh GeLU and
its gradient inside the GEMMs' epilogues.

Why: torch runs each half-precision GEMM with cuBLAS's first heuristic choice, and the GeLU as separate
elementwise passes. Here each problem's candidates are timed once and the fastest kept (level with torch's choice
at most of issue 25's shapes, faster at a few), and the tanh GeLU runs in the GEMMs' epilogues (forward: bias +
GeLU, writing the pre-activation too; backward: GeLU' times the gradient, where that times faster). Whole compiled
steps measured +1.1% to +1.9% tok/s at 350M, 1.3B, 2.7B and the Llama shape (benchmarks/RESULTS.md, 2026-12-07,
session 39). cuBLASLt is reached through nvmath-python's bindings (the optional `gpu` extra). Where they are
not installed, on other devices, or for a layout, dtype or alignment not handled here, each op runs its torch
reference, so what a GEMM computes never depends on them: only its rounding (the algorithm's summation order,
and the epilogues rounding once where torch rounds twice).

Row-major `a @ b` is cuBLAS's column-major `b^T @ a^T`: `problem` is the one place that translates (tested
against a column-major emulation on CPU). Each problem's descriptors and chosen algorithm are made once per
process: the heuristic's first candidate unless another times more than 3% faster on the current stream
(`fastest`). A problem cuBLASLt refuses, or one first met while a CUDA graph is being captured, runs the
reference; torch's reduced-precision-reduction flags bound the split-K schemes as they bound torch's own GEMMs.
The forward GeLU GEMM has a second way, quack-kernels' (model/quack_gemm.py, where that optional package loads),
and the faster of the two is kept per problem likewise (`pick`). The choice is per process and per run:
--deterministic-mode leaves the GEMMs to torch. The ops are custom ops, opaque to torch.compile;
benchmarks/cublaslt_check.py checks them on a GPU against their references (and that the path ran) and times
them.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import quack_gemm
from .grad_accumulation import fusing, main_grad_of, weight_grad

try:   # the optional GPU extra; its absence only means the references run
    import numpy as np
    from nvmath.bindings import cublas as _cublas
    from nvmath.bindings import cublasLt as _lt
    LOADED = True
except Exception:   # noqa: BLE001 (any import failure: missing package, missing CUDA libraries)
    LOADED = False

CANDIDATES = 8                 # heuristic candidates timed per problem
WORKSPACE = 32 * 1024 * 1024   # bytes a candidate may use
_DTYPES = {torch.bfloat16: 14, torch.float16: 2}   # cudaDataType: CUDA_R_16BF, CUDA_R_16F
_R_32F = 0


@dataclass(frozen=True)
class Problem:
    """One row-major `a [M, K] @ b [K, N]` as cuBLAS's column-major D (N x M, ld N) = op(A) @ op(B), A being b's
    memory and B a's: (transa, transb) in "NT"; each matrix as (rows, cols, ld) of its column-major storage."""
    m: int
    n: int
    k: int
    transa: str
    transb: str
    a_layout: tuple[int, int, int]
    b_layout: tuple[int, int, int]


def _storage(shape: tuple[int, int], stride: tuple[int, int]) -> Optional[tuple[str, tuple[int, int, int]]]:
    """A row-major matrix X [R, C] as column-major storage: rows contiguous (stride (ld, 1)) it is X^T stored
    C x R ("N" gives X^T); columns contiguous (stride (1, ld)) it is X stored R x C ("T" gives X^T)."""
    (r, c), (s0, s1) = shape, stride
    if s1 == 1 and s0 >= max(c, 1):
        return "N", (c, r, s0)
    if s0 == 1 and s1 >= max(r, 1):
        return "T", (r, c, s1)
    return None


def problem(a_shape, a_stride, b_shape, b_stride) -> Optional[Problem]:
    """The cuBLAS form of row-major a @ b (None for layouts it cannot take without a copy)."""
    ta, tb = _storage(tuple(b_shape), tuple(b_stride)), _storage(tuple(a_shape), tuple(a_stride))
    if ta is None or tb is None:
        return None
    return Problem(m=b_shape[1], n=a_shape[0], k=a_shape[1], transa=ta[0], transb=tb[0],
                   a_layout=ta[1], b_layout=tb[1])


def _mm_ref(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return (torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)).contiguous()


def _mm_gelu_ref(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pre = torch.addmm(bias, a, b).contiguous()
    return F.gelu(pre, approximate="tanh"), pre


def _mm_dgelu_ref(a: torch.Tensor, b: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(torch.mm(a, b), pre, approximate="tanh").contiguous()


@torch.library.custom_op("gpt3d::lt_mm", mutates_args=())
def lt_mm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """a [M, K] @ b [K, N] (+ bias [N]), row-major [M, N]."""
    return _mm_ref(a, b, bias)


@torch.library.custom_op("gpt3d::lt_mm_gelu", mutates_args=())
def lt_mm_gelu(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GeLU_tanh(pre), pre) with pre = a @ b + bias, both row-major [M, N]."""
    return _mm_gelu_ref(a, b, bias)


@torch.library.custom_op("gpt3d::lt_mm_dgelu", mutates_args=())
def lt_mm_dgelu(a: torch.Tensor, b: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """(a @ b) * GeLU_tanh'(pre), row-major [M, N]: the gradient before a tanh GeLU whose output's is a @ b."""
    return _mm_dgelu_ref(a, b, pre)


@lt_mm.register_fake
def _(a, b, bias):
    return a.new_empty(a.shape[0], b.shape[1])


@lt_mm_gelu.register_fake
def _(a, b, bias):
    return a.new_empty(a.shape[0], b.shape[1]), a.new_empty(a.shape[0], b.shape[1])


@lt_mm_dgelu.register_fake
def _(a, b, pre):
    return a.new_empty(a.shape[0], b.shape[1])


def _align(ptr: int) -> int:
    return min(256, ptr & -ptr) if ptr else 256


def fastest(candidates: list, margin: float = 0.03) -> int:
    """The index of the fastest of `candidates` (callables on the current stream), each timed over 3 runs after
    one warm-up; the first unless another is more than `margin` faster (timing noise does not move a choice
    off the default), and the first where a CUDA graph is being captured (no timing there). A candidate that
    raises on its first call is out."""
    if len(candidates) == 1 or torch.cuda.is_current_stream_capturing():
        return 0
    times = []
    for go in candidates:
        try:
            go()
        except Exception:   # noqa: BLE001 (e.g. cuBLASLt refusing one algorithm): not a candidate
            times.append(float("inf"))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            go()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    best = min(range(len(candidates)), key=times.__getitem__)
    return 0 if times[0] <= times[best] * (1 + margin) else best


def pick(choices: dict, key: tuple, ways: list):
    """Run the way `choices` holds for `key` among `ways` (callables doing the same work, the first the default;
    `key` must fix how many ways there are), choosing it by `fastest` when `key` is first met; the first way,
    unchosen, while a CUDA graph is being captured. A chosen way other than the first that raises later is
    dropped for `key`, with a warning, and the first serves from then on: the ways compute the same thing, so
    only the speed changes."""
    way = choices.get(key)
    if way is None:
        if torch.cuda.is_current_stream_capturing():
            return ways[0]()
        way = choices[key] = fastest(ways)
    if way == 0:
        return ways[0]()
    try:
        return ways[way]()
    except Exception as e:   # noqa: BLE001 (a third-party kernel's error: the default way computes the same)
        warnings.warn(f"gpt3d: GEMM way {way} raised {type(e).__name__}: {e}; the default way serves this problem "
                      "from now on", RuntimeWarning, stacklevel=2)
        choices[key] = 0
        return ways[0]()


class _Plan:
    """cuBLASLt's descriptors for one problem, epilogue, dtype and alignment, its candidates and the chosen one."""

    def __init__(self, handle: int, p: Problem, dtype: int, epilogue: int, aligns: tuple[int, ...], aux_ld: int,
                 reduction_mask: int, pointers: dict):
        self.handle, self.p = handle, p
        self.desc = _lt.matmul_desc_create(int(_cublas.ComputeType.COMPUTE_32F), _R_32F)
        A = _lt.MatmulDescAttribute
        op = {"N": 0, "T": 1}   # cublasOperation_t
        self.set(A.TRANSA, op[p.transa])
        self.set(A.TRANSB, op[p.transb])
        self.set(A.EPILOGUE, epilogue)
        if aux_ld:
            self.set(A.EPILOGUE_AUX_LD, aux_ld)
        # the per-call pointers: host buffers made once
        self.ptrs = {a: np.zeros(1, dtype=_lt.get_matmul_desc_attribute_dtype(a))
                     for a in (A.BIAS_POINTER, A.EPILOGUE_AUX_POINTER)}
        for attr, ptr in pointers.items():   # the first call's, so the heuristic sees real ones
            self.set_pointer(attr, ptr)
        self.layouts = [_lt.matrix_layout_create(dtype, *p.a_layout), _lt.matrix_layout_create(dtype, *p.b_layout),
                        _lt.matrix_layout_create(dtype, p.m, p.n, p.m)]
        pref = _lt.matmul_preference_create()
        P = _lt.MatmulPreferenceAttribute
        for attr, v in ((P.MAX_WORKSPACE_BYTES, WORKSPACE), (P.MIN_ALIGNMENT_A_BYTES, aligns[0]),
                        (P.MIN_ALIGNMENT_B_BYTES, aligns[1]), (P.MIN_ALIGNMENT_C_BYTES, aligns[2]),
                        (P.MIN_ALIGNMENT_D_BYTES, aligns[2]), (P.REDUCTION_SCHEME_MASK, reduction_mask)):
            _set(_lt.matmul_preference_set_attribute, _lt.get_matmul_preference_attribute_dtype, pref, attr, v)
        self.results = _lt.MatmulHeuristicResult(CANDIDATES)
        found = np.zeros(1, dtype=np.int32)
        a, b, d = self.layouts
        _lt.matmul_algo_get_heuristic(handle, self.desc, a, b, d, d, pref, CANDIDATES, self.results.ptr,
                                      found.ctypes.data)
        _lt.matmul_preference_destroy(pref)
        self.count = int(found[0])
        self.algos = [self.results[i]["algo"] for i in range(self.count)]   # kept: cuBLASLt reads them by address
        self.algo_ptrs = [x.ctypes.data for x in self.algos]
        self.choice: Optional[int] = None
        # cuBLASLt wants a little more than an epilogue algorithm reports (as nvmath-python allows for)
        self.workspace = int(np.max(self.results["workspace_size"][:max(self.count, 1)])) + 16 * (epilogue != 1)

    def set(self, attr, value: int) -> None:
        _set(_lt.matmul_desc_set_attribute, _lt.get_matmul_desc_attribute_dtype, self.desc, attr, value)

    def set_pointer(self, attr, ptr: int) -> None:
        buf = self.ptrs[attr]
        buf[0] = ptr
        _lt.matmul_desc_set_attribute(self.desc, attr, buf.ctypes.data, buf.itemsize)


def _set(setter, dtype_of, obj, attr, value: int) -> None:
    buf = np.array([value], dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.itemsize)


class _Runtime:
    """Per process: one cuBLASLt handle per device, the plans (None: a call the references serve), a workspace
    per (device, stream), host alpha/beta."""

    def __init__(self):
        self.handles: dict[int, int] = {}
        self.plans: dict[tuple, Optional[_Plan]] = {}
        self.workspaces: dict[tuple[int, int], torch.Tensor] = {}
        self.launches = 0   # cuBLASLt calls made (benchmarks/cublaslt_check.py: the path ran, not the reference)
        self.alpha, self.beta = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)
        self.alpha_ptr, self.beta_ptr = self.alpha.ctypes.data, self.beta.ctypes.data

    def make(self, a: torch.Tensor, b: torch.Tensor, code: int, gelu_aux: bool, reduction_mask: int,
             pointers: dict) -> Optional[_Plan]:
        """The plan, or None where cuBLASLt has no algorithm for it (or refuses it): the reference serves."""
        p = problem(a.shape, a.stride(), b.shape, b.stride())
        if p is None or min(p.m, p.n, p.k) == 0 or gelu_aux and p.m % 8:   # the GeLU input's leading dimension
            return None
        device = a.device.index
        try:
            with torch.cuda.device(device):
                if device not in self.handles:
                    self.handles[device] = _lt.create()
                # outputs come from torch's allocator: 256-byte aligned
                plan = _Plan(self.handles[device], p, _DTYPES[a.dtype], code,
                             (_align(b.data_ptr()), _align(a.data_ptr()), 256), p.m if gelu_aux else 0,
                             reduction_mask, pointers)
        except _lt.cuBLASLtError:   # e.g. NOT_SUPPORTED: no algorithm for this problem and epilogue
            return None
        return plan if plan.count else None

    def workspace(self, device: torch.device, stream: int) -> Optional[torch.Tensor]:
        ws = self.workspaces.get((device.index, stream))
        if ws is None and not torch.cuda.is_current_stream_capturing():   # never from a graph's private pool
            ws = self.workspaces[(device.index, stream)] = torch.empty(WORKSPACE + 16, dtype=torch.uint8,
                                                                       device=device)
        return ws

    def run(self, plan: _Plan, i: int, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, ws: torch.Tensor,
            stream: int) -> None:
        self.launches += 1
        _lt.matmul(plan.handle, plan.desc, self.alpha_ptr, b.data_ptr(), plan.layouts[0], a.data_ptr(),
                   plan.layouts[1], self.beta_ptr, d.data_ptr(), plan.layouts[2], d.data_ptr(), plan.layouts[2],
                   plan.algo_ptrs[i], ws.data_ptr(), plan.workspace, stream)


_RT: Optional[_Runtime] = _Runtime() if LOADED else None
GELU_WAYS: dict[tuple, int] = {}   # lt_mm_gelu's way per problem: 0 cuBLASLt's, GELU_QUACK_WAY quack's
GELU_QUACK_WAY = 1   # the index of quack's way (model/quack_gemm.py) in lt_mm_gelu's ways
_EPILOGUE = {"default": 1, "bias": 4, "gelu_aux_bias": 164, "dgelu": 192}   # cublasLtEpilogue_t


def way_key(*tensors: torch.Tensor) -> tuple:
    """What a GEMM's plan or choice of way depends on: each operand's shape, strides, dtype and pointer
    alignment, the device, and the split-K schemes torch's flags allow (keys of `_RT.plans`, `GELU_WAYS` and
    model/bias_grad.py's MLP-backward choice)."""
    return tuple((t.shape, t.stride(), t.dtype, _align(t.data_ptr())) for t in tensors) + (
        tensors[0].device.index, _reduction_mask(tensors[0].dtype))


def _reduction_mask(dtype: torch.dtype) -> int:
    """cuBLASLt's split-K reduction schemes torch's flag allows: all (7), or only in the compute type (2) when
    reduced-precision reductions are off for this dtype, as torch asks of its own cuBLASLt calls."""
    m = torch.backends.cuda.matmul
    allowed = (m.allow_bf16_reduced_precision_reduction if dtype == torch.bfloat16
               else m.allow_fp16_reduced_precision_reduction)
    return 7 if allowed else 2


def _lt_call(a: torch.Tensor, b: torch.Tensor, epilogue: str, bias: Optional[torch.Tensor] = None,
             aux: Optional[torch.Tensor] = None, aux_out: bool = False) -> Optional[tuple[torch.Tensor, ...]]:
    """Row-major a @ b through cuBLASLt with `epilogue`, or None where it does not apply (the caller then runs
    the reference). `aux` is the GeLU input read by dgelu; `aux_out` makes gelu_aux_bias return it too."""
    if _RT is None or a.dtype not in _DTYPES or b.dtype != a.dtype or a.dim() != 2 or b.dim() != 2:
        return None
    n, m = a.shape[0], b.shape[1]
    if bias is not None and (bias.dtype != a.dtype or bias.shape != (m,) or bias.stride() != (1,)
                             or bias.data_ptr() % 16):
        return None
    if aux is not None and (aux.dtype != a.dtype or aux.shape != (n, m) or aux.stride() != (m, 1)
                            or aux.data_ptr() % 16):
        return None
    stream = torch.cuda.current_stream(a.device).cuda_stream
    ws = _RT.workspace(a.device, stream)
    mask = _reduction_mask(a.dtype)
    key = way_key(a, b) + (epilogue,)
    plan = _RT.plans.get(key, False)
    if ws is None or plan is False and torch.cuda.is_current_stream_capturing():
        return None   # a graph being captured: what it would first need, made outside it
    d = torch.empty(n, m, dtype=a.dtype, device=a.device)
    out = torch.empty_like(d) if aux_out else None
    A = _lt.MatmulDescAttribute
    pointers = {}
    if bias is not None:
        pointers[A.BIAS_POINTER] = bias.data_ptr()
    if aux is not None or out is not None:   # gelu_aux_bias: D = `out` (GeLU), aux = `d` (its input)
        pointers[A.EPILOGUE_AUX_POINTER] = (aux if aux is not None else d).data_ptr()
    if plan is False:
        plan = _RT.plans[key] = _RT.make(a, b, _EPILOGUE[epilogue], aux_out or aux is not None, mask, pointers)
    if plan is None:
        return None
    for attr, ptr in pointers.items():
        plan.set_pointer(attr, ptr)
    target = out if out is not None else d
    try:
        if plan.choice is None:
            plan.choice = fastest([lambda i=i: _RT.run(plan, i, a, b, target, ws, stream)
                                   for i in range(plan.count)])
        _RT.run(plan, plan.choice, a, b, target, ws, stream)
    except _lt.cuBLASLtError:   # every candidate refused at launch: the reference from now on
        _RT.plans[key] = None
        return None
    return (target, d) if out is not None else (d,)


def _register() -> None:
    @lt_mm.register_kernel("cuda")
    def _(a, b, bias):
        r = _lt_call(a, b, "default" if bias is None else "bias", bias=bias)
        return r[0] if r is not None else _mm_ref(a, b, bias)

    @lt_mm_gelu.register_kernel("cuda")
    def _(a, b, bias):
        def lt():
            r = _lt_call(a, b, "gelu_aux_bias", bias=bias, aux_out=True)
            return (r[0], r[1]) if r is not None else _mm_gelu_ref(a, b, bias)
        if not quack_gemm.applies(a, b, bias):   # one way: no choice (`GELU_WAYS` holds only two-way problems)
            return lt()
        return pick(GELU_WAYS, way_key(a, b, bias), [lt, lambda: quack_gemm.mm_gelu(a, b, bias) or lt()])

    @lt_mm_dgelu.register_kernel("cuda")
    def _(a, b, pre):
        r = _lt_call(a, b, "dgelu", aux=pre)
        return r[0] if r is not None else _mm_dgelu_ref(a, b, pre)


if LOADED:
    _register()


@functools.cache
def _library_loads() -> bool:
    """nvmath-python imports without its CUDA library; cuBLASLt itself loads on first use."""
    try:
        _lt.get_version()
        return True
    except Exception:   # noqa: BLE001 (no libcublasLt where nvmath-python looks)
        return False


def cublaslt_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether training routes its GEMMs here (unless --no-gemm-tuning): CUDA, nvmath-python and cuBLASLt
    loaded, bf16 or fp16 parameters (the dtypes handled and checked)."""
    return device.type == "cuda" and LOADED and dtype in _DTYPES and _library_loads()


class _Linear(torch.autograd.Function):
    """F.linear(x2, w, b) on a 2-D x2 with its three GEMMs through the ops above. It returns the GEMM's own
    output, never a view of it: the caller views it in the input's shape outside, since autograd forbids
    in-place changes (the row-parallel all-reduce's) to a view made inside a custom function."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                main_grad: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x2, w)
        ctx.bias, ctx.main_grad = b is not None, main_grad
        return lt_mm(x2, w.t(), b)

    @staticmethod
    def backward(ctx: Any, dy2: torch.Tensor) -> tuple:
        x2, w = ctx.saved_tensors
        dx = lt_mm(dy2, w, None) if ctx.needs_input_grad[0] else None
        dw = weight_grad(dy2, x2, ctx.main_grad, _lt_mm2) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def _lt_mm2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return lt_mm(a, b, None)


@fusing
def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`set_matmul`'s function (parallel/layers.py): F.linear through cuBLASLt, its weight gradient added into
    the gradient buffer where that is on (model/grad_accumulation.py)."""
    y = _Linear.apply(x.reshape(-1, x.shape[-1]), w, b, main_grad_of(w))
    return y.view(*x.shape[:-1], w.shape[0])


def enable_cublaslt(model: torch.nn.Module) -> int:
    """Route every TP linear of `model` whose GEMM is still torch's (no `set_matmul` function yet: FP8 comes
    first) through `linear`; returns how many. Linears whose module runs a fused function (an MLP's `set_fused`,
    attention's `set_fused_qkv`: model/bias_grad.py's take `lt` themselves) are left alone: that function, not
    the linear, runs their GEMMs."""
    from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
    from .attention import SelfAttention
    from .gpt import MLP
    bypassed = {id(x) for m in model.modules() if isinstance(m, (MLP, SelfAttention)) for x in m.fused_linears()}
    n = 0
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m._matmul is None and id(m) not in bypassed:
            m.set_matmul(linear)
            n += 1
    return n
