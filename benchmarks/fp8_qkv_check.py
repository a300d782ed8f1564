"""GPU check of gpt3d/model/fp8_qkv_triton.py against its reference (gpt3d/model/fp8_qkv.py), and timings.

    python benchmarks/fp8_qkv_check.py [--sweep]

1. Correctness: for the bench shapes and ragged ones, query/key/value gradients laid out as attention's
   backward leaves them (contiguous [T, heads, hd]), as strided views and heads-major: amax, column sums and
   the E5M2 bytes in both layouts against the torch reference on the same GPU (asserted: the kernels only move
   and scale bf16 values, so the bytes must be identical), and NaN propagation.
2. Timing: the two passes against Inductor compiling the reference from the same three gradients (what the
   per-linear path gets: assemble, sums, amax, cast both layouts); --sweep tries tile configs.
Exploratory: the numbers that count go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpt3d.model import fp8_qkv as Q  # noqa: E402
from gpt3d.model import fp8_qkv_triton as k  # noqa: E402
from fp8_mlp_check import timed  # noqa: E402

# (tokens, query heads, kv heads, head dim): 1.3B 8x1, the Llama shape 4x1, 125M 16x1, ragged
SHAPES = [(16384, 16, 16, 128), (8192, 32, 8, 64), (32768, 12, 12, 64), (1000, 6, 2, 48), (4112, 4, 4, 16)]


def grads(T, heads, kv, hd, layout, g):
    def one(m):
        if layout == "strided":
            return torch.randn(T, 2 * m, hd, device="cuda", generator=g).bfloat16()[:, ::2]
        if layout == "heads-major":
            return torch.randn(m, T, hd, device="cuda", generator=g).bfloat16().transpose(0, 1)
        return torch.randn(T, m, hd, device="cuda", generator=g).bfloat16()
    return one(heads), one(kv), one(kv)


def reference(dq, dk, dv, dtype):
    full = Q.assemble(dq, dk, dv).float()
    amax, sums = full.abs().amax(), full.sum(0)
    scale = Q.fp8_mlp.to_scale(amax, dtype)
    q = Q.fp8_mlp.quantize(full, scale, dtype)
    return amax, sums, scale, q, q.t().contiguous()


def check() -> bool:
    ok = True
    g = torch.Generator(device="cuda").manual_seed(0)
    for T, heads, kv, hd in SHAPES:
        for layout in ("contiguous", "strided", "heads-major"):
            dq, dk, dv = grads(T, heads, kv, hd, layout, g)
            amax, sums, scale, q, q_t = reference(dq, dk, dv, Q.E5M2)
            a, s = k.stats(dq, dk, dv, True)
            o, o_t = k.cast(dq, dk, dv, scale, Q.E5M2)
            same = (torch.equal(a, amax) and torch.equal(o.view(torch.uint8), q.view(torch.uint8))
                    and torch.equal(o_t.view(torch.uint8), q_t.view(torch.uint8)))
            rel = ((s - sums).abs().max() / sums.abs().max()).item()
            good = same and rel < 1e-5
            ok &= good
            print(f"CHECK qkv T={T} heads={heads} kv={kv} hd={hd} {layout}: amax and bytes identical {same}, "
                  f"sums max rel {rel:.2e} {'ok' if good else 'FAIL'}")
    dq, dk, dv = grads(4112, 4, 4, 16, "contiguous", g)
    dk[7, 2, 3] = float("nan")
    a, _ = k.stats(dq, dk, dv, False)
    o, _ = k.cast(dq, dk, dv, Q.fp8_mlp.to_scale(a, Q.E5M2), Q.E5M2)
    nan = bool(a.isnan()) and bool(o.float().isnan().all())
    ok &= nan
    print(f"CHECK qkv NaN propagates (amax NaN, every byte NaN as the reference): {nan}")
    return ok


def bench(sweep: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)

    def inductor(dq, dk, dv):
        full = Q.assemble(dq, dk, dv)
        scale = Q.fp8_mlp.to_scale(full.abs().amax(), Q.E5M2)
        q = Q.fp8_mlp.quantize(full, scale, Q.E5M2)
        return full.float().sum(0), q, q.t().contiguous()
    compiled = torch.compile(inductor)
    for T, heads, kv, hd in SHAPES[:3]:
        dq, dk, dv = grads(T, heads, kv, hd, "contiguous", g)
        scale = torch.ones((), device="cuda")
        mb = T * (heads + 2 * kv) * hd * 2 / 1e6
        src = (dq, dk, dv)
        t_ind = timed(lambda src=src: compiled(*src))
        configs = [(dict(k.STATS), dict(k.CAST))]
        if sweep:
            configs += [(dict(ROWS=r, BT=bt, num_warps=w), dict(BT=ct, num_warps=cw))
                        for r, bt, w, ct, cw in ((128, 16, 4, 16, 4), (256, 32, 8, 64, 8), (512, 16, 4, 32, 8),
                                                 (256, 8, 2, 64, 4))]
        for st, ca in configs:
            k.STATS, k.CAST = st, ca
            t_s = timed(lambda src=src: k.stats(*src, True))
            t_c = timed(lambda src=src, scale=scale: k.cast(*src, scale, Q.E5M2))
            print(f"BENCH qkv T={T} heads={heads} kv={kv} hd={hd} ({mb:.0f} MB bf16): Inductor {t_ind:.0f} us; "
                  f"ours {t_s + t_c:.0f} us (stats {t_s:.0f} at {mb / t_s:.2f} TB/s, cast {t_c:.0f} at "
                  f"{2 * mb / t_c:.2f} TB/s) stats {st} cast {ca}")
        k.STATS, k.CAST = configs[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", __import__("triton").__version__)
    ok = check()
    bench(a.sweep)
    print("CHECK", "PASSED" if ok else "FAILED")
    assert ok


if __name__ == "__main__":
    main()
