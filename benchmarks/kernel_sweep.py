"""Kernel speeds across sizes on one GPU: the data behind the planner's size-aware compute model.

Why a sweep: one calibration at the 1.3B shape charged every GEMM at large-GEMM
speed, and `gpt3d plan` came out 29-73% optimistic for 125M at micro-batch 8 x
1024 (benchmarks/RESULTS.md 2026-12-02). This times, with CUDA events, bf16:
  * every matmul of a transformer layer (forward x·Wᵀ, input gradient dy·W, weight
    gradient dyᵀ·x) for GPT/Llama shapes 125M to 13B, TP 1 to 8, 1k to 32k tokens,
    and the output layer's three matmuls;
  * fused causal attention forward + backward (cuDNN first, as training runs it)
    for head sizes 64 and 128, micro-batches 1 to 16, sequences 1k to 4k;
  * (part head_dims) the same at head sizes 64 to 128 in steps of 16, seq 2048.
One JSON line per measurement goes to OUT/kernel_sweep.jsonl; `gpt3d.plan.fit`
fits the planner's Calibration to such a file.

    python benchmarks/kernel_sweep.py --out $OUT            # on the GPU machine (~1-2 minutes)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpt3d.model.attention import sdpa_backend_context

# (name, hidden, heads, kv heads, ffn, swiglu, vocab)
MODELS = [("125M", 768, 12, 12, 3072, False, 50304), ("1.3B", 2048, 16, 16, 8192, False, 50304),
          ("llama-1.5B", 2048, 32, 8, 8192, True, 128256), ("6.7B", 4096, 32, 32, 16384, False, 50304),
          ("13B", 5120, 40, 40, 20480, False, 50304)]
TOKENS = [1024, 2048, 4096, 8192, 16384, 32768]


def timed(fn, min_ms: float = 15.0) -> float:
    """Seconds per call: warm up, pick a count that fills ~min_ms, time it with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    n = max(3, min(200, int(min_ms / max(a.elapsed_time(b), 1e-3))))
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n / 1e3


def layer_weights(h, nh, nkv, f, swiglu, tp):
    """(name, out, in) of one TP rank's layer matmuls."""
    hd = h // nh
    return [("qkv", (nh + 2 * nkv) * hd // tp, h), ("proj", h, nh * hd // tp)] + \
        ([("gate", f // tp, h)] if swiglu else []) + [("fc1", f // tp, h), ("fc2", h, f // tp)]


def gemm_rows(dev, emit):
    seen = set()
    for name, h, nh, nkv, f, swiglu, vocab in MODELS:
        for tp in (1, 2, 4, 8):
            if nkv % tp or nh % tp:
                continue
            for T in TOKENS:
                if T * max(f, vocab // 4) * 2 * 3 > 6e9:    # keep each operand set under ~6 GB
                    continue
                mats = layer_weights(h, nh, nkv, f, swiglu, tp) + [("logits", vocab // tp, h)]
                for wname, n, k in mats:
                    for kind, (M, N, K) in (("fwd", (T, n, k)), ("dgrad", (T, k, n)), ("wgrad", (n, k, T))):
                        key = (M, N, K)
                        if key in seen:
                            continue
                        seen.add(key)
                        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
                        s = timed(functools.partial(torch.mm, x, w.t()))
                        emit({"kind": "gemm", "model": name, "tp": tp, "tokens": T, "weight": wname, "op": kind,
                              "M": M, "N": N, "K": K, "seconds": s, "tflops": 2 * M * N * K / s / 1e12})
                        del x, w


def _causal_sdpa(q, k, v, gqa: bool, dev):
    with sdpa_backend_context("auto", dev):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def _backward(fwd, g):
    fwd().backward(g)


ATTENTION_SHAPES = ((64, 12, 12), (128, 16, 16), (64, 32, 8), (128, 40, 40), (128, 8, 8), (128, 4, 4), (64, 16, 4))
# head sizes between 64 and 128 (2.7B's 2560 / 32 = 80), at the 2.7B and 1.3B bench shapes' heads and micro-batch
HEAD_DIM_SHAPES = tuple((hd, h, h) for hd in (64, 80, 96, 112, 128) for h in (16, 32))


def attention_rows(dev, emit, shapes=ATTENTION_SHAPES, seqs=(1024, 2048, 4096), batches=(1, 2, 4, 8, 16)):
    for hd, heads, kv in shapes:
        for s in seqs:
            for b in batches:
                if b * s > 32768:
                    continue
                q = torch.randn(b, heads, s, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(b, kv, s, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn_like(k, requires_grad=True)
                g = torch.randn(b, heads, s, hd, device=dev, dtype=torch.bfloat16)
                fwd = functools.partial(_causal_sdpa, q, k, v, kv != heads, dev)
                fwd_bwd = functools.partial(_backward, fwd, g)
                tf, tfb = timed(fwd), timed(fwd_bwd)
                flops = 2 * b * s * s * heads * hd   # forward, causal (half of 4·b·s²·heads·hd)
                emit({"kind": "attention", "head_dim": hd, "heads": heads, "kv_heads": kv, "b": b, "s": s,
                      "forward_s": tf, "fwd_bwd_s": tfb, "fwd_tflops": flops / tf / 1e12,
                      "fwd_bwd_tflops": 3.5 * flops / tfb / 1e12})
                del q, k, v, g, fwd, fwd_bwd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--parts", nargs="+", default=["gemm", "attention"], choices=["gemm", "attention", "head_dims"])
    a = p.parse_args()
    dev = torch.device("cuda")
    path = os.path.join(a.out, "kernel_sweep.jsonl")
    t0 = time.time()
    with open(path, "a") as fh:
        def emit(row):
            row["device"] = torch.cuda.get_device_name()
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        if "gemm" in a.parts:
            gemm_rows(dev, emit)
            print(f"gemm sweep done ({time.time() - t0:.0f} s)", flush=True)
        if "attention" in a.parts:
            attention_rows(dev, emit)
            print(f"attention sweep done ({time.time() - t0:.0f} s)", flush=True)
        if "head_dims" in a.parts:
            attention_rows(dev, emit, HEAD_DIM_SHAPES, seqs=(2048,), batches=(4, 8))
            print(f"head-size sweep done ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
