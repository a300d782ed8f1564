"""quack-kernels' GEMMs with bias + tanh GeLU, or GeLU' and the bias gradient, in their epilogues: further ways,
beside cuBLASLt's, for model/cublaslt.py's forward GeLU GEMM (`lt_mm_gelu`) and model/bias_grad.py's MLP backward
(`gelu_grad_sums_mm`).

Why: on sm_90 cuBLASLt runs its GeLU epilogues in an older kernel. Forward (bias + GeLU, the pre-activation
written too): cuBLASLt 0.806 ms at 1.3B's fc1 against 0.706 for the plain GEMM, quack's CuTe-DSL GEMM (its
epilogue overlapped with the next tile's main loop) 0.720. Backward (GeLU' and fc1's bias gradient): cuBLASLt's
DGELU epilogue + a sum 0.908 ms, the GEMM + the Triton pass 1.044, quack's epilogue reducing the column sums as it
goes 0.749 (2.7B: forward 0.629 -> 0.567, backward 0.704 -> 0.594; 350M: 0.479 -> 0.397 and 0.705 -> 0.505; one
H100, benchmarks/RESULTS.md, 2026-12-07, session 41). Whole 1.3B steps +1.7%. quack's plain GEMMs measured
3-20% slower than cuBLAS's, so only these two ops offer it; model/cublaslt.py and model/bias_grad.py time every
way once per problem and keep the fastest (`cublaslt.pick`).

A third use, for FP8 SwiGLU MLPs (model/fp8_mlp.py): the down projection's FP8 input-gradient GEMM
with SwiGLU's backward and both gradients' amaxes in its epilogue (`mm_dswiglu_amax`); not a timed way: where
quack raises there, fp8_mlp warns once and its reference serves. With quack's default tile it measured 3.54 ms
against cuBLAS's plain FP8 GEMM's 0.21 ms at the Llama shape (one H100, benchmarks/RESULTS.md, session 45): on
sm_90 quack's FP8 GEMM accumulates without fast accumulation by adding each k-tile's product into a second fp32
accumulator, which doubles the accumulator registers, and the default 128x192 pingpong tile (192 a thread, 384
doubled) spills. Tiles whose doubled accumulator fits measured 338-435 us (session 47); this GEMM runs the
fastest, 128x96 pingpong on clusters of 2 (96 a thread, 192 doubled): 0.36 ms with the epilogue, and with the
cast of its two outputs 566 us against the unfused backward's 598-620 us; a Llama 4x1 FP8 step +1.7%.

quack-kernels is optional (the `quack` extra) and used only where it loads, on CUDA sm_90 or newer, in bf16 and
fp16, for operands whose rows are 16-byte aligned; elsewhere its functions return None and the other ways serve.
quack compiles each kernel on first use (~3 s; its own disk cache, under ~/.quack or QUACK_CACHE_DIR, keeps them)
and imports in ~11 s: both only when training first meets the ops. The kernels run quack's default tile
configuration, not its autotuner (which compiles dozens of configurations in a process pool): the default
measured the fastest of six at 1.3B and 2.7B. quack fingerprints the code its kernels depend on and takes code
under a `site-packages` folder as installed; installed elsewhere (e.g. `pip --target` into another folder) its
first call raises, and the timing rules its way out.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Any, Optional

import torch

ACTIVATION = "gelu_tanh_approx"   # quack's name for GeLU(approximate="tanh")


@functools.cache
def _gemm_act() -> Optional[Any]:
    """quack's gemm_act, or None where quack-kernels (or its CUTLASS DSL) does not import."""
    try:
        from quack.gemm_interface import gemm_act
    except Exception:   # noqa: BLE001 (any import failure: missing package, CUDA libraries, DSL version)
        return None
    return gemm_act


launches = 0   # calls that ran quack's kernel (benchmarks/cublaslt_check.py: the way ran, not a fallback)


def loadable(t: torch.Tensor) -> bool:
    """Whether quack's kernels can load `t` (by the GPU's tensor-memory-access unit): a vector of unit stride, or a
    matrix with one unit stride whose other stride spans at least that dimension (no overlap, no broadcast), that
    stride and the pointer 16-byte aligned."""
    if t.dim() == 1:
        return t.stride(0) == 1 and t.data_ptr() % 16 == 0
    if t.dim() != 2:
        return False
    (r, c), (s0, s1) = t.shape, t.stride()
    if s1 == 1 and s0 >= max(c, 1):
        ld = s0
    elif s0 == 1 and s1 >= max(r, 1):
        ld = s1
    else:
        return False
    return ld * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0


def takes(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether `mm_gelu` (c: the bias [N]) or `mm_dgelu_sums` (c: the pre-activation [M, N]) would try these
    operands: CUDA sm_90 or newer, bf16 or fp16, each `loadable`."""
    if a.dim() != 2 or b.dim() != 2:
        return False
    m, n = a.shape[0], b.shape[1]
    return (a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype and c.dtype == a.dtype
            and b.shape[0] == a.shape[1] and c.shape in ((n,), (m, n)) and min(m, a.shape[1], n) > 0
            and n % 8 == 0 and loadable(a) and loadable(b) and loadable(c)
            and torch.cuda.get_device_capability(a.device)[0] >= 9)


@functools.cache
def _dgelu_sums() -> Optional[Any]:
    """quack's GEMM with GeLU' and the column sums in its epilogue (as quack's own dgelu_dbias_mod, without its
    post-activation output, which the MLP keeps from the forward), or None where quack does not import."""
    try:
        from quack.activation import dgelu_tanh_approx
        from quack.epilogue.frontend import gemm_epilogue
        from quack.epilogue.ops import RowVecReduce
    except Exception:   # noqa: BLE001 (as _gemm_act's)
        return None

    @gemm_epilogue(reduces={"dbias": RowVecReduce("dbias")})
    def dgelu_sums(acc, c):
        dx, _ = dgelu_tanh_approx(c, acc)
        return {"D": dx, "dbias": dx}
    return dgelu_sums


@functools.cache
def _dswiglu_amax() -> Optional[Any]:
    """quack's GEMM with SwiGLU's gradients and both their amaxes in its epilogue (element mode: the gate and up
    pre-activations as two full-tile operands, d up written as D and d gate as a second output), or None where
    quack does not import."""
    try:
        from quack.activation import dswiglu
        from quack.epilogue.frontend import gemm_epilogue
        from quack.epilogue.ops import ColVecReduce
    except Exception:   # noqa: BLE001 (as _gemm_act's)
        return None

    @gemm_epilogue(outputs=("dg",), reduces={"amax_u": ColVecReduce("amax_u", combine="max_abs"),
                                             "amax_g": ColVecReduce("amax_g", combine="max_abs")})
    def dswiglu_amax(acc, g, u, s):
        dg, du, _ = dswiglu(g, u, acc * s)
        return {"D": du, "dg": dg, "amax_u": du, "amax_g": dg}
    return dswiglu_amax


def available() -> bool:
    return _gemm_act() is not None


def dswiglu_available() -> bool:
    """Whether quack's FP8 SwiGLU-gradient epilogue (`mm_dswiglu_amax`) loads here."""
    return _dswiglu_amax() is not None


def applies(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether quack's way is offered for these operands: `takes` them and quack-kernels loads."""
    return takes(a, b, c) and available()


def takes_fp8(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether `mm_dswiglu_amax` would try these operands: CUDA sm_90 or newer, a [M, K] row-major and b [K, N]
    column-major of 8-bit floats (quack's FP8 GEMMs take K-major operands only), g and u [M, N] row-major bf16 or
    fp16, each `loadable`, K a multiple of 16 and N of 8."""
    if a.dim() != 2 or b.dim() != 2:
        return False
    m, n = a.shape[0], b.shape[1]
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    return (a.is_cuda and a.dtype in fp8 and b.dtype in fp8 and g.dtype in (torch.bfloat16, torch.float16)
            and u.dtype == g.dtype and b.shape[0] == a.shape[1] and g.shape == u.shape == (m, n)
            and min(m, n) > 0 and a.shape[1] % 16 == 0 and n % 8 == 0 and a.stride(1) == 1 and b.stride(0) == 1
            and g.stride(1) == 1 and u.stride(1) == 1 and all(loadable(t) for t in (a, b, g, u))
            and torch.cuda.get_device_capability(a.device)[0] >= 9)


def installed() -> bool:
    """Whether quack-kernels is installed here, without importing it (~11 s): for the planner."""
    return importlib.util.find_spec("quack") is not None


def mm_gelu(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(GeLU_tanh(pre), pre) with pre = a [M, K] @ b [K, N] + bias, both row-major [M, N], by quack's kernel; None
    where it does not apply (`takes`, `available`). Raises what quack raises (a first call's compile error)."""
    gemm_act = _gemm_act()
    if gemm_act is None or bias.shape != (b.shape[1],) or not takes(a, b, bias):
        return None
    global launches
    launches += 1
    pre, post = gemm_act(a, b, bias=bias, activation=ACTIVATION, tuned=False)
    return post, pre


def mm_dgelu_sums(a: torch.Tensor, b: torch.Tensor, pre: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(dh, its column sums in fp32) with dh = (a [M, K] @ b [K, N]) * GeLU_tanh'(pre), row-major [M, N]: the MLP
    backward's GeLU gradient and fc1's bias gradient in one kernel (the sums are of dh before its rounding to
    pre's dtype). None where it does not apply; raises what quack raises."""
    mod = _dgelu_sums()
    if mod is None or not takes(a, b, pre) or pre.shape != (a.shape[0], b.shape[1]):
        return None
    global launches
    launches += 1
    r = mod(a, b, pre, tuned=False)
    return r["D"], r["dbias"].float()


@functools.cache
def _fp8_config() -> Any:
    """`mm_dswiglu_amax`'s tile: one whose doubled accumulator fits the registers (module docstring)."""
    from quack.gemm_config import GemmConfig
    return GemmConfig(tile_m=128, tile_n=96, pingpong=True, cluster_m=2, is_dynamic_persistent=False)


def mm_dswiglu_amax(a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor, g: torch.Tensor,
                    u: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(d up, d gate, their amaxes [2] in fp32) of SwiGLU(g, u) = SiLU(g) * u, given da = (a @ b) * inv_a * inv_b
    (FP8 operands, fp32 accumulation with quack's periodic promotion): d up = da * SiLU(g), d gate = da * u *
    SiLU'(g), each rounded once to g's dtype (da and SiLU(g) are not rounded on the way; the amaxes are of the
    fp32 values, whose rounding gives the rounded values' amax; its max drops NaN, PTX's max.abs). None where it
    does not apply (`takes_fp8`, quack loads); raises what quack raises."""
    mod = _dswiglu_amax()
    if mod is None or not takes_fp8(a, b, g, u):
        return None
    global launches
    launches += 1
    r = mod(a, b, g=g, u=u, s=(inv_a * inv_b).reshape(1).float(), out_dtype=g.dtype, config=_fp8_config(),
            tuned=False)
    amax = torch.stack([r["amax_u"].amax(), r["amax_g"].amax()]).to(g.dtype).float()   # the rounded values'
    return r["D"], r["dg"], amax
