"""The gradient-accumulation kernel (gpt3d/optim/accumulate_triton.py) on the GPU: its bits against torch's
copy_/add_ (asserted), then its time against theirs at the 1.3B shape's large gradients.

    python benchmarks/accumulate_check.py [--sweep]

Exploratory: numbers that count go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpt3d.optim import accumulate_triton as k


def _ms(fn, reps: int = 10) -> float:
    fn()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for n in (1 << 20, 3_000_001, 2048 * 8192):
        for dt in (torch.bfloat16, torch.float16):
            src, dst = (torch.randn(n, device="cuda") * 3).to(dt), torch.randn(n, device="cuda")
            ref = dst.clone()
            k.accumulate(dst, src, True)
            ref.copy_(src)
            same_copy = torch.equal(dst, ref)
            src = torch.randn(n, device="cuda").to(dt)
            k.accumulate(dst, src, False)
            ref.add_(src)
            print(f"CHECK n={n} {dt}: copy identical {same_copy}, add identical {torch.equal(dst, ref)}")
            assert same_copy and torch.equal(dst, ref)
    h, v, layers = 2048, 50304, 24   # the 1.3B shape's gradients of >= 1M elements, one step's worth
    sizes = [v * h, 2048 * h] + [3 * h * h, h * h, 4 * h * h, 4 * h * h] * layers
    dsts = [torch.zeros(s, device="cuda") for s in sizes]
    srcs = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in sizes]
    total = sum(sizes)
    default = (k.BLOCK, k.WARPS)
    for first, name, bpe in ((True, "copy", 6), (False, "add", 10)):
        t_torch = _ms(lambda first=first: [d.copy_(s) if first else d.add_(s) for d, s in zip(dsts, srcs)])
        configs = [default] + ([(1024, 4), (2048, 4), (4096, 4), (8192, 8)] if a.sweep else [])
        for block, warps in configs:
            k.BLOCK, k.WARPS = block, warps
            t = _ms(lambda first=first: [k.accumulate(d, s, first) for d, s in zip(dsts, srcs)])
            print(f"BENCH {name} {len(sizes)} gradients, {total / 1e9:.3f}B elements: torch {t_torch:.2f} ms "
                  f"({total * bpe / t_torch / 1e9:.2f} TB/s), kernel BLOCK={block} warps={warps} {t:.2f} ms "
                  f"({total * bpe / t / 1e9:.2f} TB/s), {t_torch / t:.2f}x")


if __name__ == "__main__":
    main()
