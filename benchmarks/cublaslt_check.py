"""gpt3d/model/cublaslt.py on one GPU: its ops against their torch references, then every linear GEMM of issue
25's bench shapes timed through torch and through the tuned cuBLASLt path.

Why: training routes its bf16/fp16 GEMMs there by default where nvmath-python loads. This checks, per op and
dtype, that the cuBLASLt path ran (a plan with candidates was made) and that its error against a float64
product is at most twice torch's own plus a few ulps of the result's scale, at the bench shapes and at odd
shapes (leading dimensions not multiples of 8, offset views: where the path must fall back or still be
right). Then it times forward, input-gradient and weight-gradient GEMMs of each linear (and the GeLU
epilogues against addmm + GeLU and mm + the Triton GeLU gradient) and prints the per-step sums.

    python benchmarks/cublaslt_check.py [--shapes 350M 1.3B 2.7B llama] [--skip-check] [--reps 20]
"""
# ruff: noqa: B023  (each lambda is called before its loop variables change)
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpt3d.model import bias_grad, cublaslt, quack_gemm  # noqa: E402

# tokens per micro-batch step, layers, hidden, [(name, in, out, bias)] per layer: issue 25's bench shapes
SHAPES = {
    "125M": (16 * 2048, 12, [("qkv", 768, 2304, 1), ("proj", 768, 768, 0), ("fc1", 768, 3072, 1),
                             ("fc2", 3072, 768, 0)]),
    "350M": (16 * 2048, 24, [("qkv", 1024, 3072, 1), ("proj", 1024, 1024, 0), ("fc1", 1024, 4096, 1),
                             ("fc2", 4096, 1024, 0)]),
    "1.3B": (8 * 2048, 24, [("qkv", 2048, 6144, 1), ("proj", 2048, 2048, 0), ("fc1", 2048, 8192, 1),
                            ("fc2", 8192, 2048, 0)]),
    "2.7B": (4 * 2048, 32, [("qkv", 2560, 7680, 1), ("proj", 2560, 2560, 0), ("fc1", 2560, 10240, 1),
                            ("fc2", 10240, 2560, 0)]),
    "llama": (4 * 2048, 16, [("qkv", 2048, 3072, 0), ("proj", 2048, 2048, 0), ("gate", 2048, 8192, 0),
                             ("up", 2048, 8192, 0), ("fc2", 8192, 2048, 0)]),
}


def timed(fn, reps: int) -> float:
    """cuda_timing's median (call 3 of RESULTS.md's session 39 took the mean of 20 runs after 2 warm-ups)."""
    from cuda_timing import median_ms   # beside this script
    return median_ms(fn, reps)


def _err(got: torch.Tensor, exact: torch.Tensor) -> float:
    return (got.double() - exact).abs().max().item()


def check_one(name: str, fn, ref, exact: torch.Tensor, scale: float, lt: Optional[bool] = True) -> bool:
    """`fn`'s error against `exact` at most twice torch's (`ref`) plus 4 ulps of `scale`, and cuBLASLt ran
    (`lt`) or the reference served (False: a layout or alignment the path must leave to it; None: either)."""
    before = cublaslt._RT.launches
    got = fn()
    ran = cublaslt._RT.launches > before
    e_lt, e_ref = _err(got, exact), _err(ref(), exact)
    ok = e_lt <= 2 * e_ref + 4 * torch.finfo(got.dtype).eps * scale and lt in (None, ran)
    print(f"check {name}: error {e_lt:.3e} (torch {e_ref:.3e}), {'cuBLASLt' if ran else 'the reference'} ran "
          f"-> {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def check() -> bool:
    ok = True
    g = torch.Generator(device="cuda").manual_seed(0)
    # the bench shape, then ones whose leading dimensions are multiples of 8 but not of 16/64, and one (N = 203)
    # that is not: the GeLU epilogues need N % 8 == 0 and leave it to the reference
    cases = [(16384, 2048, 8192), (1000, 136, 520), (4112, 2064, 1032), (333, 96, 200), (333, 96, 203)]
    for dtype in (torch.bfloat16, torch.float16):
        for T, K, N in cases:
            def r(*s, scale=1.0):
                return (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype)
            x, w, b, dy = r(T, K), r(N, K, scale=0.05), r(N, scale=0.1), r(T, N, scale=0.01)
            xd, wd, bd, dyd = x.double(), w.double(), b.double(), dy.double()
            tag = f"{str(dtype)[6:]} T={T} K={K} N={N}"
            sure = None if N % 8 else True   # an odd N: cuBLASLt may or may not take the plain GEMMs
            pre = torch.addmm(bd, xd, wd.t())
            s1, s2 = pre.abs().max().item(), (dyd @ wd).abs().max().item()
            ok &= check_one(f"fwd+bias {tag}", lambda: cublaslt.lt_mm(x, w.t(), b), lambda: torch.addmm(b, x, w.t()),
                            pre, s1, sure)
            ok &= check_one(f"dgrad {tag}", lambda: cublaslt.lt_mm(dy, w, None), lambda: dy @ w, dyd @ wd, s2, sure)
            ok &= check_one(f"wgrad {tag}", lambda: cublaslt.lt_mm(dy.t(), x, None), lambda: dy.t() @ x,
                            dyd.t() @ xd, (dyd.t() @ xd).abs().max().item(), sure)
            sl = x[1:, :]   # an offset view: its pointer is 2 * K bytes past an allocation
            ok &= check_one(f"fwd offset view {tag}", lambda: cublaslt.lt_mm(sl, w.t(), None),
                            lambda: sl @ w.t(), xd[1:] @ wd.t(), s1, sure)
            xs, ws_ = x[:, 1:], w[:, 1:]   # 2-byte aligned, leading dimension K: cuBLASLt still, or the reference
            ok &= check_one(f"fwd 2-byte aligned {tag}", lambda: cublaslt.lt_mm(xs, ws_.t(), None),
                            lambda: xs @ ws_.t(), xd[:, 1:] @ wd[:, 1:].t(), s1, lt=None)
            bs = torch.cat([b[:1], b])[1:]   # a bias 2 bytes past an allocation: the reference serves
            ok &= check_one(f"fwd+unaligned bias {tag}", lambda: cublaslt.lt_mm(x, w.t(), bs),
                            lambda: torch.addmm(bs, x, w.t()), pre, s1, lt=False)
            xl, wl, bl, dyl = (t.clone().requires_grad_() for t in (x, w, b, dy))
            yl = cublaslt.linear(xl, wl, bl)
            yl.backward(dy)
            xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
            F.linear(xr, wr, br).backward(dy)
            for gname, got, want, ex in (("dx", xl.grad, xr.grad, dyd @ wd), ("dw", wl.grad, wr.grad, dyd.t() @ xd),
                                         ("db", bl.grad, br.grad, dyd.sum(0))):
                ok &= check_one(f"linear {gname} {tag}", lambda: got, lambda: want, ex, ex.abs().max().item(),
                                lt=None)
            gelu_exact = F.gelu(pre, approximate="tanh")
            cublaslt.GELU_WAYS[cublaslt.way_key(x, w.t(), b)] = 0   # cuBLASLt's way here; quack's below
            ok &= check_one(f"gelu epilogue {tag}", lambda: cublaslt.lt_mm_gelu(x, w.t(), b)[0],
                            lambda: F.gelu(torch.addmm(b, x, w.t()), approximate="tanh"), gelu_exact,
                            gelu_exact.abs().max().item(), lt=N % 8 == 0)
            ok &= check_one(f"pre-activation {tag}", lambda: cublaslt.lt_mm_gelu(x, w.t(), b)[1],
                            lambda: torch.addmm(b, x, w.t()), pre, s1, lt=N % 8 == 0)
            for way in (0, 1) if quack_gemm.available() else ():   # the forward GeLU GEMM's two ways, forced
                cublaslt.GELU_WAYS.clear()
                cublaslt.GELU_WAYS[cublaslt.way_key(x, w.t(), b)] = way
                before = quack_gemm.launches
                try:
                    post, pre_q = cublaslt.lt_mm_gelu(x, w.t(), b)
                except Exception as e:   # noqa: BLE001 (quack's compile errors: reported, the check fails)
                    print(f"check gelu way {way} {tag}: raised {type(e).__name__}: {str(e)[:300]} -> FAIL", flush=True)
                    ok = False
                    continue
                ran = quack_gemm.launches > before
                want_q = way == 1 and quack_gemm.takes(x, w.t(), b)
                ok &= ran == want_q
                print(f"check gelu way {way} {tag}: quack {'ran' if ran else 'did not run'} -> "
                      f"{'ok' if ran == want_q else 'FAIL'}", flush=True)
                ok &= check_one(f"gelu way {way} {tag}", lambda: post,
                                lambda: F.gelu(torch.addmm(b, x, w.t()), approximate="tanh"), gelu_exact,
                                gelu_exact.abs().max().item(), lt=None)
                ok &= check_one(f"pre-activation way {way} {tag}", lambda: pre_q, lambda: torch.addmm(b, x, w.t()),
                                pre, s1, lt=None)
            cublaslt.GELU_WAYS.clear()
            h = torch.addmm(b, x, w.t())
            w2 = r(K, N, scale=0.05)
            dy2 = r(T, K, scale=0.01)
            da = dy2.double() @ w2.double()
            dh_exact = torch.ops.aten.gelu_backward(da, h.double(), approximate="tanh")
            ok &= check_one(f"dgelu epilogue {tag}", lambda: cublaslt.lt_mm_dgelu(dy2, w2, h),
                            lambda: torch.ops.aten.gelu_backward(dy2 @ w2, h, approximate="tanh"), dh_exact,
                            dh_exact.abs().max().item(), lt=N % 8 == 0)
            quack_bwd = quack_gemm.applies(dy2, w2, h)
            for way in (0, 1, 2) if quack_bwd else (0, 1):   # the MLP backward's ways, each forced (2: quack's)
                bias_grad._GELU_GRAD_CHOICE.clear()
                bias_grad._GELU_GRAD_CHOICE[bias_grad.gelu_grad_key(dy2, w2, h, quack_bwd)] = way
                before = quack_gemm.launches
                try:
                    dh2, sums = bias_grad.gelu_grad_sums_mm(dy2, w2, h)
                except Exception as e:   # noqa: BLE001 (quack's compile errors: reported, the check fails)
                    print(f"check gelu_grad_sums_mm way {way} {tag}: raised {type(e).__name__}: {str(e)[:300]} "
                          "-> FAIL", flush=True)
                    ok = False
                    continue
                ran = quack_gemm.launches > before
                ok &= ran == (way == 2)
                print(f"check gelu_grad_sums_mm way {way} {tag}: quack {'ran' if ran else 'did not run'} -> "
                      f"{'ok' if ran == (way == 2) else 'FAIL'}", flush=True)
                want, want_sums = bias_grad.gelu_grad_sums(dy2 @ w2, h, True)
                ok &= check_one(f"gelu_grad_sums_mm way {way} {tag}", lambda: dh2, lambda: want, dh_exact,
                                dh_exact.abs().max().item(), lt=None)
                ok &= check_one(f"gelu_grad_sums_mm way {way} sums {tag}", lambda: sums, lambda: want_sums,
                                dh_exact.sum(0), dh_exact.abs().sum(0).max().item(), lt=None)
    return ok


def bench(shapes: list[str], reps: int) -> None:
    dtype = torch.bfloat16
    for shape in shapes:
        T, layers, lins = SHAPES[shape]
        tot_t = tot_l = 0.0
        for name, fin, fout, has_b in lins:
            x = torch.randn(T, fin, device="cuda", dtype=dtype)
            w = torch.randn(fout, fin, device="cuda", dtype=dtype) * 0.02
            b = torch.randn(fout, device="cuda", dtype=dtype) if has_b else None
            dy = torch.randn(T, fout, device="cuda", dtype=dtype) * 0.01
            pairs = {
                "fwd": (lambda: F.linear(x, w, b), lambda: cublaslt.lt_mm(x, w.t(), b)),
                "dgrad": (lambda: dy @ w, lambda: cublaslt.lt_mm(dy, w, None)),
                "wgrad": (lambda: dy.t() @ x, lambda: cublaslt.lt_mm(dy.t(), x, None)),
            }
            row = []
            for k, (ft, fl) in pairs.items():
                t, lt = timed(ft, reps), timed(fl, reps)
                tot_t, tot_l = tot_t + t, tot_l + lt
                flops = 2 * T * fin * fout
                row.append(f"{k} {t:.3f}/{lt:.3f} ms ({flops / lt / 1e9:.0f} TF/s)")
            print(f"{shape} {name} [{fin}->{fout}] torch/tuned: " + ", ".join(row), flush=True)
            if name == "fc1" and has_b:
                gelu = torch.compile(lambda h: F.gelu(h, approximate="tanh"))
                h = torch.addmm(b, x, w.t())
                w2 = torch.randn(fin, fout, device="cuda", dtype=dtype) * 0.02
                dy2 = torch.randn(T, fin, device="cuda", dtype=dtype) * 0.01
                f_t = timed(lambda: gelu(torch.addmm(b, x, w.t())), reps)
                f_w = []   # the forward epilogue's ways, each forced: cuBLASLt's, quack's where it loads
                for way in (0, 1) if quack_gemm.available() else (0,):
                    cublaslt.GELU_WAYS[cublaslt.way_key(x, w.t(), b)] = way
                    f_w.append(f"{timed(lambda: cublaslt.lt_mm_gelu(x, w.t(), b), reps):.3f}")
                cublaslt.GELU_WAYS.clear()
                b_t = timed(lambda: bias_grad.gelu_grad_sums(dy2 @ w2, h, True), reps)
                b_l = timed(lambda: cublaslt.lt_mm_dgelu(dy2, w2, h).sum(0, dtype=torch.float32), reps)
                b_q = (f"{timed(lambda: quack_gemm.mm_dgelu_sums(dy2, w2, h), reps):.3f}"
                       if quack_gemm.applies(dy2, w2, h) else "-")
                print(f"{shape} fc1 GeLU: forward addmm + compiled GeLU {f_t:.3f} vs epilogue (cuBLASLt/quack) "
                      f"{'/'.join(f_w)} ms; "
                      f"backward mm + Triton GeLU grad/sums {b_t:.3f} vs epilogue + sum {b_l:.3f}, "
                      f"quack's epilogue with the sums {b_q} ms", flush=True)
        print(f"{shape}: a layer's GEMMs torch {tot_t:.3f} ms, tuned {tot_l:.3f} ms; x {layers} layers: "
              f"{(tot_t - tot_l) * layers:+.2f} ms a step saved (the GeLU epilogues' own saving: the line above)",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["350M", "1.3B", "2.7B", "llama"])
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, nvmath-python "
          f"{'loaded' if cublaslt.LOADED else 'MISSING'}, quack-kernels "
          f"{'loaded' if quack_gemm.available() else 'missing'}", flush=True)
    if not cublaslt.LOADED:
        sys.exit(1)
    ok = True if a.skip_check else check()
    bench(a.shapes, a.reps)
    print("CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
