"""GPU check of gpt3d/model/fp8_mlp_triton.py against its reference (gpt3d/model/fp8_mlp.py), and timings.

    python benchmarks/fp8_mlp_check.py [--sweep] [--mlp] [--only gelu|swiglu|epilogue]

1. Correctness: for bench shapes and ragged ones, both GeLU forms, forward and backward: the Triton stats
   and casts against the torch reference on the same GPU (amax, column sums, FP8 bytes in both layouts).
   Triton's erf/exp and CUDA's may differ in the last bit, which can move a rounding: mismatches must be
   rare and one FP8 step at most; a layout or mask bug shows as a large fraction.
2. Timing of the two passes (stats + cast) against Inductor compiling the reference (what the per-linear
   path gets), per shape; --sweep tries tile configs.
3. --mlp: the whole MLP forward + backward, compiled, fused function vs gpt3d's per-linear FP8
   (torchao's function per linear) vs bf16, at the 1.3B shape (GeLU) and the Llama shape (SwiGLU).
The SwiGLU checks and timings follow the same pattern.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpt3d.model import fp8_mlp_triton as k  # noqa: E402
from gpt3d.model import fp8_mlp as M  # noqa: E402

SHAPES = [(16384, 8192), (8192, 10240), (16384, 4096), (16384, 3072), (1000, 136), (4112, 2064)]


def timed(fn, iters=20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1000   # us


def reference(h, da, tanh, dtype):
    v = M._gelu_value(h, da, tanh)
    amax = v.abs().amax()
    sums = v.sum(0) if da is not None else None
    scale = M.to_scale(amax, dtype)
    q = M.quantize(v, scale, dtype)
    return amax, sums, q, q.t().contiguous()


def fp8_steps(q: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|q - exact| in FP8 steps at exact's magnitude (correct rounding: <= 0.5; the bf16 rounding between, as the
    unfused model stores the value, and a few fp32 ulps of the kernel's arithmetic can turn that into one step)."""
    fi = torch.finfo(dtype)
    exact = exact.clamp(-fi.max, fi.max)
    low = math.log2(fi.smallest_normal)
    e = torch.floor(torch.log2(exact.abs().clamp(min=fi.smallest_normal)))
    return (q.double() - exact).abs() / (torch.exp2(e.clamp(min=low)) * fi.eps)


def check() -> bool:
    ok = True
    g = torch.Generator(device="cuda").manual_seed(0)
    for T, F in SHAPES:
        for tanh in (False, True):
            h = (torch.randn(T, F, device="cuda", generator=g) * 2).to(torch.bfloat16)
            da = (torch.randn(T, F, device="cuda", generator=g) * 1e-3).to(torch.bfloat16)
            for d in (None, da):
                dtype = M.E4M3 if d is None else M.E5M2
                amax_r, sums_r, q_r, qt_r = reference(h, d, tanh, dtype)
                amax, sums = k.stats(h, d, tanh)
                scale = M.to_scale(amax_r, dtype)   # the same scale, so the casts compare byte for byte
                q, qt = k.cast(h, d, scale, tanh, dtype)
                bad = (q.view(torch.uint8) != q_r.view(torch.uint8))
                # each differing byte judged against the exact value (float64): within one FP8 step of it
                exact = M._gelu_value(h.double(), None if d is None else d.double(), tanh) * scale.double()
                step = fp8_steps(q[bad], exact[bad], dtype).max().item() if bad.any() else 0.0
                step_r = fp8_steps(q_r[bad], exact[bad], dtype).max().item() if bad.any() else 0.0
                layout = torch.equal(qt.view(torch.uint8), q.t().contiguous().view(torch.uint8))
                srel = 0.0 if sums is None else ((sums - sums_r).abs().max() / sums_r.abs().max()).item()
                arel = abs(amax.item() - amax_r.item()) / amax_r.item()
                frac = bad.float().mean().item()
                good = layout and arel < 1e-2 and srel < 1e-3 and step <= 1.0
                ok &= good
                print(f"check T={T} F={F} tanh={tanh} {'bwd' if d is not None else 'fwd'}: amax rel {arel:.1e}, "
                      f"sums rel {srel:.1e}, fp8 bytes differing {bad.sum().item()} ({frac:.1e}), there the "
                      f"farthest from the exact value {step:.2f} FP8 steps (torch's {step_r:.2f}), transposed copy "
                      f"{'ok' if layout else 'WRONG'} -> {'ok' if good else 'FAIL'}")
    return ok & special_values() & gate()


def gate() -> bool:
    """The forward amax through the range pass (fp8_mlp_triton.stats) equals the GeLU pass's (_stats_kernel)
    exactly: where the range settles it (typical h) and where it hands over (small or negative h, -inf)."""
    import triton
    ok = True
    g = torch.Generator(device="cuda").manual_seed(2)
    for what in ("x2", "x0.1", "x0.02", "negative", "-inf", "+inf"):
        for T, F in ((16384, 8192), (1000, 136)):
            h = torch.randn(T, F, device="cuda", generator=g)
            h = {"x2": h * 2, "x0.1": h * 0.1, "x0.02": h * 0.02, "negative": -h.abs()}.get(what, h)
            h[T // 3, F // 2] = {"-inf": float("-inf"), "+inf": float("inf")}.get(what, h[T // 3, F // 2])
            for dt in (torch.bfloat16, torch.float16):
                for tanh in (False, True):
                    hh = h.to(dt)
                    c = k.STATS
                    grid = (triton.cdiv(T, c["ROWS"]), triton.cdiv(F, c["BF"]))
                    part = torch.empty(grid, device="cuda", dtype=torch.float32)
                    k._stats_kernel[grid](hh, hh, part, part, T, F, ROWS=c["ROWS"], BT=c["BT"], BF=c["BF"],
                                          BACKWARD=False, TANH=tanh, num_warps=c["num_warps"])
                    a, full = k.stats(hh, None, tanh)[0], part.amax()
                    same = torch.equal(a, full) or bool(a.isnan() and full.isnan())
                    ok &= same
                    if not same or (T, dt, tanh) == (16384, torch.bfloat16, True):
                        print(f"gate {what} T={T} F={F} {dt} tanh={tanh}: range path {a.item()} GeLU pass "
                              f"{full.item()} -> {'ok' if same else 'FAIL'}")
    return ok


def special_values() -> bool:
    """A NaN, an inf, all zeros: the kernels give what the reference gives (NaN everywhere for a NaN or inf
    amax, the inf entry NaN and the rest zero for an inf gradient, zeros for zeros)."""
    ok = True
    for what in ("nan h", "inf da", "zeros"):
        h = torch.randn(256, 384, device="cuda").to(torch.bfloat16)
        da = torch.randn(256, 384, device="cuda").to(torch.bfloat16)
        if what == "nan h":
            h[17, 33] = float("nan")
        elif what == "inf da":
            da[200, 5] = float("inf")
        else:
            h.zero_()
            da.zero_()
        for d in (None, da):
            dtype = M.E4M3 if d is None else M.E5M2
            amax_r, sums_r, q_r, _ = reference(h, d, False, dtype)
            amax, sums = k.stats(h, d, False)
            q, qt = k.cast(h, d, M.to_scale(amax, dtype), False, dtype)
            a, b = q.float(), q_r.float()
            same = (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
                    and torch.equal(amax.isnan(), amax_r.isnan()) and torch.equal(qt.float().isnan(), a.t().isnan())
                    and (sums is None or torch.equal(sums.isnan(), sums_r.isnan())))
            ok &= same
            print(f"special {what} {'bwd' if d is not None else 'fwd'}: amax {amax.item()} (reference "
                  f"{amax_r.item()}), NaN outputs {int(a.isnan().sum())} (reference {int(b.isnan().sum())}) -> "
                  f"{'ok' if same else 'FAIL'}")
    return ok


def inductor_pair(backward: bool, tanh: bool, dtype):
    def f(h, da):
        v = M._gelu_value(h, da if backward else None, tanh)
        amax = v.abs().amax()
        scale = M.to_scale(amax, dtype)
        q = M.quantize(v, scale, dtype)
        return q, q.t().contiguous(), (v.sum(0) if backward else amax)
    return torch.compile(f)


def bench(sweep: bool) -> None:
    for T, F in SHAPES[:4]:
        h = torch.randn(T, F, device="cuda").to(torch.bfloat16)
        da = (torch.randn(T, F, device="cuda") * 1e-3).to(torch.bfloat16)
        for backward in (False, True):
            d = da if backward else None
            dtype = M.E5M2 if backward else M.E4M3
            ind = inductor_pair(backward, False, dtype)
            t_ind = timed(lambda ind=ind, h=h, da=da: ind(h, da))

            def ours(h=h, d=d, dtype=dtype):
                amax, _ = k.stats(h, d, False)
                return k.cast(h, d, M.to_scale(amax, dtype), False, dtype)
            t_ours = timed(ours)
            amax, _ = k.stats(h, d, False)
            scale = M.to_scale(amax, dtype)
            t_s = timed(lambda h=h, d=d: k.stats(h, d, False))
            t_c = timed(lambda h=h, d=d, s=scale, dt=dtype: k.cast(h, d, s, False, dt))
            gb_s = T * F * 2 * (2 if backward else 1) / 1e9
            gb_c = gb_s + T * F * 2 / 1e9
            print(f"time T={T} F={F} {'bwd' if backward else 'fwd'}: inductor {t_ind:.0f} us, triton {t_ours:.0f} us "
                  f"(stats {t_s:.0f} us {gb_s / t_s * 1e3:.2f} TB/s, cast {t_c:.0f} us {gb_c / t_c * 1e3:.2f} TB/s)")
            if sweep and (T, F) == SHAPES[0]:
                stats0, cast0 = dict(k.STATS), dict(k.CAST)
                for rows, bt, bf, w in [(256, 32, 128, 8), (512, 32, 128, 4), (256, 16, 128, 4), (128, 32, 128, 4),
                                        (256, 64, 64, 4), (512, 64, 64, 4), (256, 32, 64, 4), (512, 32, 256, 8),
                                        (1024, 64, 64, 4), (256, 64, 128, 8)]:
                    k.STATS.update(ROWS=rows, BT=bt, BF=bf, num_warps=w)
                    us = timed(lambda h=h, d=d: k.stats(h, d, False))
                    print(f"  sweep stats ROWS={rows} BT={bt} BF={bf} w={w}: {us:.0f} us")
                k.STATS.update(stats0)
                for bt, bf, w in [(32, 128, 4), (64, 64, 4), (32, 64, 4), (16, 128, 4), (32, 256, 8), (64, 128, 4),
                                  (32, 128, 8)]:
                    k.CAST.update(BT=bt, BF=bf, num_warps=w)
                    print(f"  sweep cast BT={bt} BF={bf} w={w}: "
                          f"{timed(lambda h=h, d=d, s=scale, dt=dtype: k.cast(h, d, s, False, dt)):.0f} us")
                k.CAST.update(cast0)


SWIGLU_SHAPES = [(8192, 8192), (16384, 5632), (1000, 136), (4112, 2064)]


def swiglu_reference(g, u, da, dtype, sums):
    vals = M._swiglu_values(g, u, da)
    amax = torch.stack([v.abs().amax() for v in vals])
    scale = M.to_scale(amax, dtype)
    qs = [M.quantize(v, scale[i], dtype) for i, v in enumerate(vals)]
    return amax, (torch.stack([v.sum(0) for v in vals]) if da is not None and sums else None), qs, scale


def check_swiglu() -> bool:
    """The SwiGLU kernels against the reference, as check() does for GeLU, plus NaN / inf / zeros."""
    ok = True
    gen = torch.Generator(device="cuda").manual_seed(1)
    cases = [(T, F, None) for T, F in SWIGLU_SHAPES] + [(256, 384, w) for w in ("nan g", "inf da", "zeros")]
    for T, F, special in cases:
        g = (torch.randn(T, F, device="cuda", generator=gen) * 2).to(torch.bfloat16)
        u = (torch.randn(T, F, device="cuda", generator=gen) * 2).to(torch.bfloat16)
        da = (torch.randn(T, F, device="cuda", generator=gen) * 1e-3).to(torch.bfloat16)
        if special == "nan g":
            g[17, 33] = float("nan")
        elif special == "inf da":
            da[200, 5] = float("inf")
        elif special == "zeros":
            g.zero_(), u.zero_(), da.zero_()
        for d, sums in ((None, False), (da, True), (da, False)):
            dtype = M.E4M3 if d is None else M.E5M2
            amax_r, sums_r, qs_r, scale = swiglu_reference(g, u, d, dtype, sums)
            amax, total = k.swiglu_stats(g, u, d, sums)
            out = k.swiglu_cast(g, u, d, scale, dtype)
            good = len(out) == 2 * len(qs_r) and torch.equal(amax.isnan(), amax_r.isnan())
            good &= bool((((amax - amax_r).abs() / amax_r.abs()).nan_to_num() < 1e-2).all())
            worst = 0.0
            for i, q_r in enumerate(qs_r):
                q, q_t = out[2 * i].float(), out[2 * i + 1]
                a, b = q, q_r.float()
                good &= torch.equal(q_t.float().isnan(), a.t().isnan())
                good &= torch.equal(q_t.view(torch.uint8), out[2 * i].t().contiguous().view(torch.uint8))
                if special:
                    good &= torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
                else:
                    bad = (out[2 * i].view(torch.uint8) != q_r.view(torch.uint8))
                    frac = bad.float().mean().item()
                    if frac:
                        worst = max(worst, ((a - b).abs() / b.abs().clamp(min=1e-30))[bad].max().item())
                    good &= frac < 1e-4 and worst <= 0.5
            if total is not None and not special:
                good &= bool(((total - sums_r).abs().amax(1) / sums_r.abs().amax(1) < 1e-3).all())
            good &= (total is None) == (sums_r is None)
            ok &= good
            print(f"swiglu {special or f'T={T} F={F}'} {'bwd' if d is not None else 'fwd'} sums={sums}: amax "
                  f"{amax.tolist()} (reference {amax_r.tolist()}), worst rel {worst:.3f} -> {'ok' if good else 'FAIL'}")
    return ok


def bench_swiglu() -> None:
    for T, F in SWIGLU_SHAPES[:2]:
        g, u = (torch.randn(T, F, device="cuda").to(torch.bfloat16) for _ in range(2))
        da = (torch.randn(T, F, device="cuda") * 1e-3).to(torch.bfloat16)
        for d in (None, da):
            dtype = M.E4M3 if d is None else M.E5M2

            def ref(g, u, d, dtype=dtype):
                vals = M._swiglu_values(g, u, d)
                amax = torch.stack([v.abs().amax() for v in vals])
                scale = M.to_scale(amax, dtype)
                return [q for i, v in enumerate(vals) for q in (M.quantize(v, scale[i], dtype),
                                                                 M.quantize(v, scale[i], dtype).t().contiguous())]
            ind = torch.compile(ref)
            t_ind = timed(lambda g=g, u=u, d=d, ind=ind: ind(g, u, d))

            def ours(g=g, u=u, d=d, dtype=dtype):
                amax, _ = k.swiglu_stats(g, u, d, False)
                return k.swiglu_cast(g, u, d, M.to_scale(amax, dtype), dtype)
            print(f"swiglu time T={T} F={F} {'bwd' if d is not None else 'fwd'}: inductor {t_ind:.0f} us, "
                  f"triton {timed(ours):.0f} us")


def time_dgrad_epilogue(dy8, w2_8t, inv_dy, inv_w2, g, u) -> None:
    from gpt3d.model import quack_gemm
    T, F = g.shape

    def old():
        da = M.scaled_mm(dy8, w2_8t.t(), inv_dy, inv_w2, torch.bfloat16, False)
        amax, _ = k.swiglu_stats(g, u, da, False)
        return k.swiglu_cast(g, u, da, M.to_scale(amax, M.E5M2), M.E5M2)

    def new():
        du, dg, amax = quack_gemm.mm_dswiglu_amax(dy8, w2_8t.t(), inv_dy, inv_w2, g, u)
        return k.cast_pair(du, dg, M.to_scale(amax, M.E5M2), M.E5M2)

    @torch.compile
    def per_linear(g, u, dy8):   # what the per-linear path runs: the GEMM, then Inductor's passes
        da = torch._scaled_mm(dy8, w2_8t.t(), scale_a=inv_dy, scale_b=inv_w2, out_dtype=torch.bfloat16)
        vals = M._swiglu_values(g, u, da)
        sc = M.to_scale(torch.stack([v.abs().amax() for v in vals]), M.E5M2)
        return [q for i, v in enumerate(vals) for q in (M.quantize(v, sc[i], M.E5M2),
                                                         M.quantize(v, sc[i], M.E5M2).t().contiguous())]
    t_gemm = timed(lambda: M.scaled_mm(dy8, w2_8t.t(), inv_dy, inv_w2, torch.bfloat16, False))
    t_epi = timed(lambda: quack_gemm.mm_dswiglu_amax(dy8, w2_8t.t(), inv_dy, inv_w2, g, u))
    print(f"dgrad epilogue time T={T} H={dy8.shape[1]} F={F}: cuBLAS GEMM {t_gemm:.0f} us, quack GEMM + epilogue "
          f"{t_epi:.0f} us; the backward's GEMM and casts: + stats and cast passes {timed(old):.0f} us, epilogue + "
          f"cast_pair {timed(new):.0f} us, Inductor per linear {timed(lambda: per_linear(g, u, dy8)):.0f} us")


def check_dgrad_epilogue() -> bool:
    """The SwiGLU backward's dgrad epilogue (quack's GEMM, fp8_mlp.swiglu_dgrad) against its reference on the same
    GPU (cuBLAS's FP8 GEMM to fp32, torch's SiLU): d up and d gate may differ where the accumulation order or
    quack's approximate exp / reciprocal moves a rounding (rare, one bf16 step), amaxes within that; cast_pair's
    Triton kernel against its reference, bit for bit. Then times: cuBLAS's GEMM + the stats and cast passes (the
    function without the epilogue) against the epilogue GEMM + cast_pair, and Inductor's per-linear passes."""
    from gpt3d.model import quack_gemm
    if not quack_gemm.dswiglu_available():
        print("dgrad epilogue: quack-kernels does not load here; skipped")
        return True
    ok = True
    gen = torch.Generator(device="cuda").manual_seed(2)
    for T, H, F in ((8192, 2048, 8192), (4112, 2064, 1040)):
        g, u = ((torch.randn(T, F, device="cuda", generator=gen) * 2).to(torch.bfloat16) for _ in range(2))
        dy = (torch.randn(T, H, device="cuda", generator=gen) * 1e-2).to(torch.bfloat16)
        w2 = (torch.randn(H, F, device="cuda", generator=gen) * F ** -0.5).to(torch.bfloat16)
        dy8, _, inv_dy = M.cast(dy, M.E5M2)
        _, w2_8t, inv_w2 = M.cast(w2, M.E4M3)
        got = quack_gemm.mm_dswiglu_amax(dy8, w2_8t.t(), inv_dy, inv_w2, g, u)
        want = M._swiglu_dgrad_ref(dy8, w2_8t, inv_dy, inv_w2, g, u)
        if got is None:
            print(f"dgrad epilogue T={T} H={H} F={F}: quack declined the operands -> FAIL")
            ok = False
            continue
        good, fracs = True, []
        for a, b in zip(got[:2], want[:2]):
            bad = a != b
            fracs.append(bad.float().mean().item())
            rel = ((a.float() - b.float()).abs() / b.float().abs().clamp(min=1e-30))[bad]
            good &= fracs[-1] < 1e-2 and (rel.numel() == 0 or rel.max().item() <= 2 ** -7)
        good &= bool(((got[2] - want[2]).abs() <= want[2].abs() * 2 ** -7).all())
        scale = M.to_scale(got[2], M.E5M2)
        pair = k.cast_pair(got[0], got[1], scale, M.E5M2)
        ref = M.cast_pair(got[0].cpu(), got[1].cpu(), scale.cpu(), M.E5M2)   # on CPU the op runs its reference
        good &= all(torch.equal(p.view(torch.uint8).cpu(), r.view(torch.uint8)) for p, r in zip(pair, ref))
        ok &= good
        print(f"dgrad epilogue T={T} H={H} F={F}: d up / d gate differ at {fracs[0]:.1e} / {fracs[1]:.1e}, amaxes "
              f"{got[2].tolist()} (reference {want[2].tolist()}), cast_pair bytes "
              f"{'equal' if good else 'DIFFER'} -> {'ok' if good else 'FAIL'}")
        if (T, H, F) == (8192, 2048, 8192):
            time_dgrad_epilogue(dy8, w2_8t, inv_dy, inv_w2, g, u)
    return ok


def mlp_bench(swiglu: bool) -> None:
    """The whole MLP, compiled, forward + backward: bf16, FP8 per linear, FP8 as one function (1.3B's GeLU
    MLP, T=16384 H=2048 F=8192, with a bias; the Llama shape's SwiGLU, T=8192 H=2048 F=8192, without). The
    SwiGLU function as training builds it: with the dgrad epilogue where quack-kernels loads (since session 43)."""
    import torch.nn.functional as Fn
    from gpt3d.model.fp8 import Float8Matmul, _fused_mlp
    T, H, F = (8192, 2048, 8192) if swiglu else (16384, 2048, 8192)
    torch.manual_seed(0)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(F, H, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(H, F, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16) * 1e-2
    fused = _fused_mlp(Float8Matmul("tensorwise"), swiglu, "none", torch.device("cuda"))
    if swiglu:
        wg = (torch.randn(F, H, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
        weights, leaves, names = (wg, None, w1, None, w2), (x, wg, w1, w2), "y, dx, dwg, dw1, dw2"

        def bf16():
            return Fn.linear(Fn.silu(Fn.linear(x, wg)) * Fn.linear(x, w1), w2)
    else:
        b1 = torch.zeros(F, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weights, leaves, names = (w1, b1, w2), (x, w1, b1, w2), "y, dx, dw1, db1, dw2"

        def bf16():
            return Fn.linear(Fn.gelu(Fn.linear(x, w1, b1)), w2)
    variants = {"bf16": bf16, "fp8 per linear": lambda: fused.fallback(x, *weights),
                "fp8 fused": lambda: fused(x, *weights)}
    tag = "swiglu " if swiglu else ""
    outs = {}
    for name, fn in variants.items():
        c = torch.compile(fn)

        def step(c=c):
            y = c()
            y.backward(dy)
            return y
        us = timed(step, 10)
        for t in leaves:
            t.grad = None
        y = step()
        outs[name] = [y.detach().float()] + [t.grad.float() for t in leaves]
        for t in leaves:
            t.grad = None
        print(f"{tag}mlp T={T} H={H} F={F} {name}: {us / 1000:.3f} ms fwd+bwd")
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()  # noqa: E731
    for name in ("fp8 per linear", "fp8 fused"):
        print(f"{tag}mlp {name} vs bf16 cosine ({names}):",
              " ".join(f"{cos(a, b):.5f}" for a, b in zip(outs[name], outs["bf16"])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--mlp", action="store_true")
    ap.add_argument("--only", choices=["gelu", "swiglu", "epilogue"])
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", __import__("triton").__version__)
    ok = True
    if a.only == "epilogue":
        print("CHECK", "PASSED" if check_dgrad_epilogue() else "FAILED")
        return
    if a.only != "swiglu":
        ok &= check()
        bench(a.sweep)
        if a.mlp:
            mlp_bench(False)
    if a.only != "gelu":
        ok &= check_swiglu()
        ok &= check_dgrad_epilogue()
        bench_swiglu()
        if a.mlp:
            mlp_bench(True)
    print("CHECK", "PASSED" if ok else "FAILED")


if __name__ == "__main__":
    main()
