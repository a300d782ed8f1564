"""Gradient-accumulation fusion's op (gpt3d/model/grad_accumulation.py) on one GPU: its sums against float64
(asserted, with the hooks' path beside it for scale), then its time against the path it replaces.

The replaced path is what the gradient buffer's hooks did for each weight every micro-batch: the weight-gradient
GEMM into a bf16/fp16 tensor, then the Triton add into the fp32 slot (gpt3d/optim/accumulate.py). The fused op is
one GEMM whose fp32 output adds onto the slot. Shapes: each weight of one layer at issue 25's Llama-1.5B shape
(4 x 2048 tokens) and 1.3B shape (8 x 2048), both dtypes; per-layer totals printed, and what the layers of a
micro-batch save.

    python benchmarks/grad_accumulation_check.py

Exploratory: numbers that count go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.cuda_timing import median_ms  # noqa: E402
from gpt3d.model.grad_accumulation import wgrad_accumulate  # noqa: E402
from gpt3d.optim.accumulate import accumulate  # noqa: E402

# (name, tokens, layers, [(out, in) of each linear weight of a layer])
SHAPES = [("llama-1.5B", 4 * 2048, 16, [(3072, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]),
          ("1.3B", 8 * 2048, 24, [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192)])]


def check(dtype: torch.dtype) -> None:
    """Fused sums within fp32's reach of float64's; the hooks' path (product rounded to `dtype` first) shown."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for t, o, i in ((8192, 3072, 2048), (1000, 136, 72), (4096, 2048, 8192)):
        dy = torch.randn(t, o, device="cuda", generator=g).to(dtype)
        x = torch.randn(t, i, device="cuda", generator=g).to(dtype)
        main = torch.randn(o, i, device="cuda", generator=g)
        ref = main.double() + dy.double().t() @ x.double()
        fused = main.clone()
        wgrad_accumulate(fused, dy, x)
        hooks = main.clone()
        accumulate(hooks, (dy.t() @ x).contiguous(), False)
        scale = (dy.double().abs().t() @ x.double().abs()).max().item()
        e_fused = (fused.double() - ref).abs().max().item() / scale
        e_hooks = (hooks.double() - ref).abs().max().item() / scale
        print(f"CHECK {dtype} T={t} {o}x{i}: max error / max |dy|^T|x|: fused {e_fused:.2e}, hooks {e_hooks:.2e}")
        assert e_fused < 1e-5, e_fused   # fp32 accumulation (hooks' path carries dtype's rounding, ~4e-3 / 5e-4)


def bench(dtype: torch.dtype) -> None:
    for name, t, layers, weights in SHAPES:
        tot_h = tot_f = 0.0
        for o, i in weights:
            dy = torch.randn(t, o, device="cuda").to(dtype)
            x = torch.randn(t, i, device="cuda").to(dtype)
            main = torch.zeros(o, i, device="cuda")

            def hooks(main=main, dy=dy, x=x):
                accumulate(main, dy.t() @ x, False)
            th = median_ms(hooks)
            tf = median_ms(lambda main=main, dy=dy, x=x: wgrad_accumulate(main, dy, x))
            tg = median_ms(lambda dy=dy, x=x: dy.t() @ x)
            tot_h, tot_f = tot_h + th, tot_f + tf
            print(f"BENCH {name} {dtype} {o}x{i} T={t}: GEMM alone {tg:.3f} ms, GEMM + hook add {th:.3f}, "
                  f"fused {tf:.3f}")
        print(f"LAYER {name} {dtype}: GEMMs + hook adds {tot_h:.3f} ms, fused {tot_f:.3f} ms; {layers} layers: "
              f"{(tot_h - tot_f) * layers:.2f} ms a micro-batch saved")


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    for dt in (torch.bfloat16, torch.float16):
        check(dt)
    for dt in (torch.bfloat16, torch.float16):
        bench(dt)


if __name__ == "__main__":
    main()
