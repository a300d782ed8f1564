"""Would the bf16 step gain from bias gradients summed where their tensors are written? A probe, not yet gpt3d's path.

Why: session 36's profiles (benchmarks/RESULTS.md, 2026-12-06) show two passes at 1.3B and 350M that only re-read
a tensor another kernel has just written: fc1's bias gradient sums the GeLU gradient (86 us a layer at 1.3B,
268 MB) and the QKV bias gradient sums the query/key/value gradients (70 us) after Inductor has assembled them
into the fused layout (129 us). Together ~3.7 ms of a 177 ms 350M step and ~3.8 of a 264 ms 1.3B one. This
times gpt3d's own MLP and SelfAttention modules at the bench shapes, compiled as training compiles them, forward
+ backward, against the same modules with their existing fusion hooks (`MLP.set_fused`, `set_fused_qkv`, which
the FP8 path uses) given two bf16 functions:

  mlp  h = x W1^T + b1 (bias in the GEMM's epilogue), GeLU, fc2's GEMM; backward: one Triton pass writes the
       GeLU gradient and its column sums (fc1's bias gradient; the tile loop of gpt3d/model/fp8_mlp_triton.py's
       stats kernel without the amax), then the GEMMs
  qkv  the QKV GEMM with its bias in the epilogue, q, k, v handed back as views (gpt3d/model/fp8_qkv.py's
       structure); backward: one Triton pass reads dq, dk, dv where attention left them (fp8_qkv_triton.py's
       `_tile`) and writes the fused gradient and its column sums, then the GEMMs

and prints milliseconds per call, the saving over the layers of a step, and how far the gradients are from the
compiled modules'. Exploratory: a change to gpt3d comes only with a measured gain, in RESULTS.md.

    python benchmarks/bias_grad_probe.py [--shapes 350M 1.3B 2.7B] [--rows 256 --bt 16 --bf 128 --warps 4]
        (--bf is the GeLU kernel's column tile; the QKV kernel's is the largest power of two dividing the head dim)
    TRITON_INTERPRET=1 python benchmarks/bias_grad_probe.py --check-cpu   # the kernels' arithmetic on CPU
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpt3d.config import ModelConfig  # noqa: E402
from gpt3d.model.attention import SelfAttention, split_qkv  # noqa: E402
from gpt3d.model.fp8_mlp_triton import _value  # noqa: E402
from gpt3d.model.fp8_qkv import assemble  # noqa: E402
from gpt3d.model.fp8_qkv_triton import _layout, _tile  # noqa: E402
from gpt3d.model.gpt import MLP  # noqa: E402
from gpt3d.parallel.state import ParallelState  # noqa: E402

# (layers, hidden, heads, micro-batch): issue 25's bf16 bench shapes with biases, seq 2048
SHAPES = {"125M": (12, 768, 12, 16), "350M": (24, 1024, 16, 16), "1.3B": (24, 2048, 16, 8), "2.7B": (32, 2560, 32, 4)}
TILE = dict(ROWS=256, BT=16, BF=128, num_warps=4)


@triton.jit
def _gelu_grad_kernel(da_ptr, h_ptr, dh_ptr, sum_ptr, T, F, ROWS: tl.constexpr, BT: tl.constexpr,
                      BF: tl.constexpr, TANH: tl.constexpr):
    pid_t, pid_f = tl.program_id(0), tl.program_id(1)
    cols = pid_f * BF + tl.arange(0, BF)
    cmask = cols < F
    total = tl.zeros((BT, BF), tl.float32)
    for i in range(0, ROWS, BT):
        rows = pid_t * ROWS + i + tl.arange(0, BT)
        mask = (rows[:, None] < T) & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * F + cols[None, :]
        g = _value(h_ptr, da_ptr, offs, mask, True, TANH)   # da * GeLU'(h), rounded as autograd stores it
        tl.store(dh_ptr + offs, g.to(dh_ptr.dtype.element_ty), mask=mask)
        total += g
    tl.store(sum_ptr + pid_t * F + cols, tl.sum(total, axis=0), mask=cmask)


@triton.jit
def _qkv_grad_kernel(q_ptr, k_ptr, v_ptr, q_t, q_h, k_t, k_h, v_t, v_h, out_ptr, sum_ptr, T, N, GROUP,
                     HD: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    pid_t, pid_f = tl.program_id(0), tl.program_id(1)
    cols = pid_f * BF + tl.arange(0, BF)
    total = tl.zeros((BT, BF), tl.float32)
    for r in range(0, ROWS, BT):
        rows = pid_t * ROWS + r + tl.arange(0, BT)
        x = _tile(q_ptr, k_ptr, v_ptr, q_t, q_h, k_t, k_h, v_t, v_h, rows, T, pid_f, GROUP, HD, BF)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], x.to(out_ptr.dtype.element_ty),
                 mask=rows[:, None] < T)
        total += x
    tl.store(sum_ptr + pid_t * N + cols, tl.sum(total, axis=0))


def gelu_grad_sums(da: torch.Tensor, h: torch.Tensor, tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(da * GeLU'(h) in h's dtype, its column sums in fp32) through the Triton kernel; [T, F] contiguous."""
    da, h = da.contiguous(), h.contiguous()   # the kernel indexes row * F + col
    T, n = h.shape
    c = TILE
    grid = (triton.cdiv(T, c["ROWS"]), triton.cdiv(n, c["BF"]))
    dh = torch.empty_like(h)
    part = torch.empty((grid[0], n), device=h.device, dtype=torch.float32)
    _gelu_grad_kernel[grid](da, h, dh, part, T, n, ROWS=c["ROWS"], BT=c["BT"], BF=c["BF"], TANH=tanh,
                            num_warps=c["num_warps"])
    return dh, part.sum(0)


def qkv_grad_sums(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the fused gradient [T, N] in dq's dtype, its column sums in fp32) through the Triton kernel."""
    src, strides, T, N, group, hd, bf = _layout(dq, dk, dv)
    c = TILE
    grid = (triton.cdiv(T, c["ROWS"]), N // bf)
    out = torch.empty((T, N), device=dq.device, dtype=dq.dtype)
    part = torch.empty((grid[0], N), device=dq.device, dtype=torch.float32)
    _qkv_grad_kernel[grid](*src, *strides, out, part, T, N, group, HD=hd, ROWS=c["ROWS"], BT=c["BT"], BF=bf,
                           num_warps=c["num_warps"])
    return out, part.sum(0)


@torch.library.custom_op("gpt3d_probe::gelu_grad_sums", mutates_args=())
def _gelu_grad_op(da: torch.Tensor, h: torch.Tensor, tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if h.is_cuda:
        return gelu_grad_sums(da, h, tanh)
    dh = torch.ops.aten.gelu_backward(da.float(), h.float(), approximate="tanh" if tanh else "none").to(h.dtype)
    return dh, dh.float().sum(0)


@_gelu_grad_op.register_fake
def _(da, h, tanh):
    return torch.empty_like(h), h.new_empty(h.shape[1], dtype=torch.float32)


@torch.library.custom_op("gpt3d_probe::qkv_grad_sums", mutates_args=())
def _qkv_grad_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if dq.is_cuda:
        return qkv_grad_sums(dq, dk, dv)
    g = assemble(dq, dk, dv)
    return g, g.float().sum(0)


@_qkv_grad_op.register_fake
def _(dq, dk, dv):
    n = (dq.shape[1] + 2 * dk.shape[1]) * dq.shape[2]
    return dq.new_empty((dq.shape[0], n)), dq.new_empty(n, dtype=torch.float32)


class _MLP(torch.autograd.Function):
    """fc2(GeLU(x W1^T + b1)) without fc2's bias, on [T, H]; fc1's bias gradient summed in the GeLU backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                tanh: bool) -> torch.Tensor:
        h = torch.addmm(b1, x, w1.t())   # a bias is required: without one there is no sum to fuse
        a = F.gelu(h, approximate="tanh" if tanh else "none")
        ctx.save_for_backward(x, w1, w2, h, a)
        ctx.tanh, ctx.b_dtype = tanh, b1.dtype
        return a @ w2.t()

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x, w1, w2, h, a = ctx.saved_tensors
        da = dy @ w2
        dw2 = dy.t() @ a
        dh, db1 = _gelu_grad_op(da, h, ctx.tanh)
        return dh @ w1, dh.t() @ x, db1.to(ctx.b_dtype), dw2, None


class _QKV(torch.autograd.Function):
    """q, k, v = split(x W^T + b) on [T, H] (views of the GEMM's output); the bias gradient summed as the
    query/key/value gradients are assembled."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, kv: int,
                hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.addmm(b, x, w.t())
        ctx.save_for_backward(x, w)
        ctx.b_dtype = b.dtype
        return split_qkv(y, kv, hd)

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple:
        x, w = ctx.saved_tensors
        g, db = _qkv_grad_op(dq, dk, dv)
        return g @ w, g.t() @ x, db.to(ctx.b_dtype), None, None


def fused_mlp(tanh: bool):
    def call(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        return _MLP.apply(x2, w1, b1, w2, tanh).reshape(*x.shape[:-1], w2.shape[0])
    return call


def fused_qkv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, kv: int, hd: int):
    return _QKV.apply(x.reshape(-1, x.shape[-1]), w, b, kv, hd)


def modules(shape: str, device: torch.device, dtype: torch.dtype, fused: bool) -> tuple[MLP, SelfAttention]:
    layers, h, heads, _ = SHAPES[shape]
    cfg = ModelConfig(num_layers=layers, hidden_size=h, num_attention_heads=heads, seq_length=2048,
                      max_position_embeddings=2048, hidden_dropout=0.0, attention_dropout=0.0)
    ps = ParallelState.single(device)
    torch.manual_seed(0)
    mlp, attn = MLP(cfg, ps), SelfAttention(cfg, ps)
    for m in (mlp, attn):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02)
        m.to(dtype)
    if fused:
        mlp.set_fused(fused_mlp(cfg.gelu_approximation == "tanh"))
        attn.set_fused_qkv(fused_qkv)
    return mlp, attn


def _grads(m: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    m.zero_grad(set_to_none=True)
    m(x).backward(dy)
    return [x.grad] + [p.grad for p in m.parameters()]


def check_cpu() -> None:
    """The kernels (in Triton's interpreter) against torch in fp32 on bf16 inputs, ragged shapes included; and
    the hooked modules against the plain ones on CPU (the ops' torch references)."""
    g = torch.Generator().manual_seed(0)
    for T, n, tanh in ((300, 96, True), (64, 200, False), (257, 128, True)):
        h = (torch.randn(T, n, generator=g) * 3).bfloat16()
        da = torch.randn(T, n, generator=g).bfloat16()
        dh, s = gelu_grad_sums(da, h, tanh)
        ref_dh, _ = _gelu_grad_op(da, h, tanh)   # CPU tensors: the torch reference
        # within two units in the last place (the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest,
        # and exp/tanh differ in fp32's last bits), or fp32's error of GeLU' times da where GeLU' is ~0
        tol = torch.maximum(ref_dh.float().abs() * 2 ** -6, da.float().abs() * 4e-6)
        ulps = ((dh.float() - ref_dh.float()).abs() / tol).max().item()
        own = dh.float().sum(0)   # the sums are of the rounded gradient, as autograd's bias gradient
        serr = ((s - own).abs() / (own.abs() + 1)).max().item()
        print(f"gelu grad T={T} F={n} tanh={tanh}: dh within {ulps:.2f} of 2 ulp, sums rel {serr:.1e}")
        assert ulps <= 1.0 and serr < 1e-5, (ulps, serr)
    for T, heads, kv, hd in ((300, 4, 4, 32), (130, 6, 2, 16)):
        dq = torch.randn(T, heads, hd, generator=g).bfloat16()
        dk = torch.randn(kv, T, hd, generator=g).bfloat16().transpose(0, 1)
        dv = torch.randn(T, 2 * kv, hd, generator=g).bfloat16()[:, ::2]
        out, s = qkv_grad_sums(dq, dk, dv)
        ref, ref_s = _qkv_grad_op(dq, dk, dv)
        assert torch.equal(out, ref), "the fused gradient must be the assembled one, bit for bit"
        serr = ((s - ref_s).abs() / (ref_s.abs() + 1)).max().item()
        print(f"qkv grad T={T} heads={heads} kv={kv} hd={hd}: assembled equal, sums rel {serr:.1e}")
        assert serr < 1e-5, serr
    cpu = torch.device("cpu")
    x = torch.randn(2, 64, 768, generator=g)
    dy = torch.randn(2, 64, 768, generator=g)
    for a, b in zip(modules("125M", cpu, torch.float32, False), modules("125M", cpu, torch.float32, True)):
        ga, gb = _grads(a, x, dy), _grads(b, x, dy)
        worst = max(((u - v).abs().max() / u.abs().max()).item() for u, v in zip(ga, gb))
        print(f"{type(a).__name__} hooked vs plain (fp32, CPU): {len(ga)} gradients, max rel diff {worst:.1e}")
        assert worst < 1e-5, worst
    print("check-cpu: ok")


def bench(shapes: list[str], reps: int, device: str = "cuda") -> None:
    from cuda_timing import median_ms
    dev = torch.device(device)
    for shape in shapes:
        layers, h, _, mbs = SHAPES[shape]
        x = torch.randn(mbs, 2048, h, device=dev, dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        rows: dict = {}
        for fused in (False, True):
            for m in modules(shape, dev, torch.bfloat16, fused):
                rows[(type(m).__name__, fused)] = [torch.compile(m), [], 0.0]
        for _ in range(2):   # the four variants in turn, twice: clock or warm-up drift shows as a spread
            for row in rows.values():
                c = row[0]
                _grads(c, x, dy)   # compiled before the memory and time are taken
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                _grads(c, x, dy)
                row[2] = max(row[2], (torch.cuda.max_memory_allocated() - base) / 2 ** 20)
                row[1].append(median_ms(lambda c=c, x=x, dy=dy: _grads(c, x, dy), reps))
        for name in ("MLP", "SelfAttention"):
            (c0, ts0, mem0), (c1, ts1, mem1) = rows[(name, False)], rows[(name, True)]
            t0, t1 = min(ts0), min(ts1)
            g0, g1 = _grads(c0, x, dy), _grads(c1, x, dy)
            worst = max(((u.float() - v.float()).abs().max() / u.float().abs().max()).item() for u, v in zip(g0, g1))
            both = "/".join(f"{t:.3f}" for t in ts0), "/".join(f"{t:.3f}" for t in ts1)
            print(f"{shape} {name}: compiled {t0:.3f} ms ({both[0]}), hooked {t1:.3f} ms ({both[1]}), {t0 / t1:.3f}x; "
                  f"x {layers} layers: {(t0 - t1) * layers:+.2f} ms a step; peak over the layer's start {mem0:.0f} / "
                  f"{mem1:.0f} MiB; gradients max rel diff {worst:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["350M", "1.3B", "2.7B"], choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    for k in ("rows", "bt", "bf", "warps"):
        ap.add_argument(f"--{k}", type=int)
    ap.add_argument("--check-cpu", action="store_true", help="with TRITON_INTERPRET=1: the arithmetic on CPU")
    a = ap.parse_args()
    for k, key in (("rows", "ROWS"), ("bt", "BT"), ("bf", "BF"), ("warps", "num_warps")):
        if getattr(a, k):
            TILE[key] = getattr(a, k)
    if a.check_cpu:
        check_cpu()
    else:
        bench(a.shapes, a.reps)


if __name__ == "__main__":
    main()
