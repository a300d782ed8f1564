"""The bias-gradient fusions (gpt3d/model/bias_grad.py) on one GPU: their Triton kernels against the ops' torch
reference, and gpt3d's own MLP and SelfAttention modules timed with and without them.

Why: training runs these kernels in every biased bf16/fp16 GPT step on CUDA (installed since whole steps
measured faster with them: benchmarks/RESULTS.md, 2026-12-07, session 38). This first checks the CUDA
kernels against the ops' torch reference at the bench shapes, bf16 and fp16 (the QKV gradient bit for bit),
then times the modules there, compiled as training compiles them, forward + backward, and prints
milliseconds per call, the saving over the layers of a step, each variant's peak memory and how far the
gradients are from the unfused modules'. `--check-cpu` runs the kernels' arithmetic in Triton's interpreter.

    python benchmarks/bias_grad_check.py [--shapes 350M 1.3B 2.7B] [--rows 256 --bt 16 --bf 128 --warps 4]
        (--bf is the GeLU kernel's column tile; the QKV kernel's is the largest power of two dividing the head dim)
    TRITON_INTERPRET=1 python benchmarks/bias_grad_check.py --check-cpu   # the kernels' arithmetic on CPU
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpt3d.config import ModelConfig  # noqa: E402
from gpt3d.model import bias_grad  # noqa: E402
from gpt3d.model import bias_grad_triton as kernels  # noqa: E402
from gpt3d.model.attention import SelfAttention  # noqa: E402
from gpt3d.model.gpt import MLP  # noqa: E402
from gpt3d.parallel.state import ParallelState  # noqa: E402

# (layers, hidden, heads, micro-batch): issue 25's bf16 bench shapes with biases, seq 2048
SHAPES = {"125M": (12, 768, 12, 16), "350M": (24, 1024, 16, 16), "1.3B": (24, 2048, 16, 8), "2.7B": (32, 2560, 32, 4)}


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
        assert bias_grad.enable_bias_grad_fusion(mlp) == bias_grad.enable_bias_grad_fusion(attn) == 1
    return mlp, attn


def _grads(m: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    m.zero_grad(set_to_none=True)
    m(x).backward(dy)
    return [x.grad] + [p.grad for p in m.parameters()]


def _worst(want: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """The largest difference between paired gradients, relative to each wanted gradient's largest element."""
    return max(((u.float() - v.float()).abs().max() / u.float().abs().max()).item() for u, v in zip(want, got))


def _sum_err(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor) -> float:
    """Column sums' largest error relative to the sum of the column's magnitudes: fp32 summation's error
    grows with those (thousands of rows), not with the sum itself, which may cancel to near 0."""
    scale = terms.float().abs().sum(0).clamp_min(torch.finfo(torch.float32).tiny)
    return ((got - want).abs() / scale).max().item()


def check_kernels(gelu_cases, qkv_cases, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
    """The kernels against the ops' torch reference in fp32 on `dtype` inputs (bf16 or fp16, training's two):
    GeLU (T, F, tanh) and QKV (T, heads, kv, hd) cases, sources laid out as attention's backward may leave
    them."""
    g = torch.Generator().manual_seed(0)
    two_ulp = 2 * torch.finfo(dtype).eps
    subnormal_step = 2 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps   # fp16's spacing below 6e-5

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)
    for T, n, tanh in gelu_cases:
        h, da = rand(T, n, scale=3.0), rand(T, n)
        dh, s = kernels.gelu_grad_sums(da, h, tanh)
        ref_dh, _ = bias_grad._gelu_ref(da, h, tanh)
        # within two units in the last place (the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest,
        # and exp/tanh differ in fp32's last bits), or fp32's error of GeLU' times da where GeLU' is ~0, or two
        # subnormal steps (fp16's gradients below 6e-5, where 2 ulp of the value is less than one step)
        tol = torch.maximum(ref_dh.float().abs() * two_ulp, da.float().abs() * 4e-6).clamp_min(subnormal_step)
        diff = (dh.float() - ref_dh.float()).abs()
        ulps = torch.where(diff == 0, 0.0, diff / tol).max().item()
        own = dh.float().sum(0)   # the sums are of the rounded gradient, as autograd's bias gradient
        serr = _sum_err(s, own, dh)
        print(f"{dtype} gelu grad T={T} F={n} tanh={tanh}: dh within {ulps:.2f} of 2 ulp, sums rel {serr:.1e}")
        assert ulps <= 1.0 and serr < 1e-5, (ulps, serr)
    for T, heads, kv, hd in qkv_cases:
        dq = rand(T, heads, hd)
        dk = rand(kv, T, hd).transpose(0, 1)
        dv = rand(T, 2 * kv, hd)[:, ::2]
        out, s = kernels.qkv_grad_sums(dq, dk, dv)
        ref, ref_s = bias_grad._qkv_ref(dq, dk, dv)
        assert torch.equal(out, ref), "the fused gradient must be the assembled one, bit for bit"
        serr = _sum_err(s, ref_s, out)
        print(f"{dtype} qkv grad T={T} heads={heads} kv={kv} hd={hd}: assembled equal, sums rel {serr:.1e}")
        assert serr < 1e-5, serr


def check_cpu() -> None:
    """The kernels (in Triton's interpreter), ragged shapes included; and the hooked modules against the plain
    ones on CPU (the ops' torch references)."""
    for dtype in (torch.bfloat16, torch.float16):
        check_kernels(((300, 96, True), (64, 200, False), (257, 128, True)), ((300, 4, 4, 32), (130, 6, 2, 16)),
                      torch.device("cpu"), dtype)
    g = torch.Generator().manual_seed(1)
    cpu = torch.device("cpu")
    x = torch.randn(2, 64, 768, generator=g)
    dy = torch.randn(2, 64, 768, generator=g)
    for a, b in zip(modules("125M", cpu, torch.float32, False), modules("125M", cpu, torch.float32, True)):
        ga, gb = _grads(a, x, dy), _grads(b, x, dy)
        worst = _worst(ga, gb)
        print(f"{type(a).__name__} hooked vs plain (fp32, CPU): {len(ga)} gradients, max rel diff {worst:.1e}")
        assert worst < 1e-5, worst
    print("check-cpu: ok")


def bench(shapes: list[str], reps: int, device: str = "cuda") -> None:
    from cuda_timing import median_ms
    dev = torch.device(device)
    for shape in shapes:
        layers, h, heads, mbs = SHAPES[shape]
        for dtype in (torch.bfloat16, torch.float16):
            check_kernels(((mbs * 2048, 4 * h, True),), ((mbs * 2048, heads, heads, h // heads),), dev, dtype)
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
            worst = _worst(g0, g1)
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
            kernels.TILE[key] = getattr(a, k)
    if kernels.TILE["ROWS"] % kernels.TILE["BT"]:
        raise SystemExit("--rows must be a multiple of --bt")
    if a.check_cpu:
        check_cpu()
    else:
        bench(a.shapes, a.reps)


if __name__ == "__main__":
    main()
