"""Why are fp16 steps ~2-3% slower than bf16 ones on the same GPU, and does a cuBLAS setting close it?

Why: `gpt3d train --fp16` ran at 0.973-0.979x of `--bf16` at 125M, 1.3B and the Llama shape (2026-12-06,
benchmarks/RESULTS.md); session 27's profile put the whole gap in cuBLAS's fp16 GEMM kernels at the very shapes
bf16 runs faster. This times one 1.3B layer's GEMMs (forward with bias, input gradient, weight gradient; 8 x
2048 tokens) and the output head's, in bf16 and fp16, under cuBLAS settings torch exposes: the default, no
reduced-precision reduction (`allow_fp16_reduced_precision_reduction`), and cuBLASLt as the preferred library.

    python benchmarks/gemm_dtype_probe.py [--tokens 16384] [--hidden 2048]

Exploratory: one line per (setting, dtype) with the sum over the GEMMs and each GEMM's time.
"""
from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from cuda_timing import median_ms   # benchmarks/, run as `python benchmarks/<script>.py`


def gemms(tokens: int, h: int, vocab: int, dtype: torch.dtype) -> dict:
    """name -> a callable running one GEMM of a GPT layer (or the head) at these sizes."""
    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype) * 0.02
    out = {}
    for name, i, o in (("qkv", h, 3 * h), ("proj", h, h), ("fc1", h, 4 * h), ("fc2", 4 * h, h)):
        x, w, b, dy = t(tokens, i), t(o, i), t(o), t(tokens, o)
        out[f"{name} fwd"] = functools.partial(F.linear, x, w, b)
        out[f"{name} dgrad"] = functools.partial(torch.mm, dy, w)
        out[f"{name} wgrad"] = functools.partial(torch.mm, dy.t(), x)
    x, w, dy = t(tokens, h), t(vocab, h), t(tokens, vocab)
    out["head fwd"] = functools.partial(F.linear, x, w)
    out["head dgrad"] = functools.partial(torch.mm, dy, w)
    out["head wgrad"] = functools.partial(torch.mm, dy.t(), x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50304)
    a = ap.parse_args()
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    m = torch.backends.cuda.matmul
    settings = {
        "default": dict(lib="cublas", rr=True),
        "no reduced-precision reduction": dict(lib="cublas", rr=False),
        "cublaslt": dict(lib="cublaslt", rr=True),
        "cublaslt, no reduced-precision reduction": dict(lib="cublaslt", rr=False),
    }
    for label, s in settings.items():
        torch.backends.cuda.preferred_blas_library(s["lib"])
        m.allow_fp16_reduced_precision_reduction = s["rr"]
        m.allow_bf16_reduced_precision_reduction = s["rr"]
        for dtype in (torch.bfloat16, torch.float16):
            ms = {k: median_ms(f) for k, f in gemms(a.tokens, a.hidden, a.vocab, dtype).items()}
            layer = sum(v for k, v in ms.items() if not k.startswith("head"))
            head = sum(v for k, v in ms.items() if k.startswith("head"))
            each = ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
            print(f"{label} | {str(dtype)[6:]} | layer {layer:.3f} ms | head {head:.3f} ms | {each}", flush=True)


if __name__ == "__main__":
    main()
