"""Attention dropout inside the fused kernel: which SDPA kernels take p = 0.1, what they drop, what it costs.

SDPA's dispatcher routes dropout away from cuDNN's attention unless p is a multiple of 1/16 (some cuDNN kernels
round p to 1/16), so with Megatron's attention dropout 0.1 a Hopper run falls back to FlashAttention-2. This
times forward + backward of one layer's attention at the bench shapes for every kernel with p = 0 and p = 0.1
(cuDNN's also called directly, past the dispatcher), and measures each kernel's effective drop rate on
uniform attention (q = k = 0, v = 1: the output's mean is (1 - p_effective) / (1 - p)).

    python benchmarks/attention_dropout.py          # on the GPU machine; prints a table
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"1.3B": (8, 16, 2048, 128), "125M": (16, 12, 2048, 64), "llama-1.5B": (4, 32, 2048, 64)}


def cudnn_direct(q, k, v, p):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, p, True, False)[0]


def via(backend):
    def run(q, k, v, p):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    return run


KERNELS = {"cudnn": via(SDPBackend.CUDNN_ATTENTION), "flash": via(SDPBackend.FLASH_ATTENTION),
           "efficient": via(SDPBackend.EFFICIENT_ATTENTION), "cudnn-direct": cudnn_direct,
           "cudnn-direct-compiled": torch.compile(cudnn_direct, dynamic=False)}


def timed(fn, q, k, v, p, reps=20):
    g = torch.randn_like(q)
    for _ in range(3):
        fn(q, k, v, p).backward(g)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn(q, k, v, p).backward(g)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def drop_rate(fn, p):
    b, h, s, d = 4, 8, 1024, 64
    q = torch.zeros(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.ones_like(q)
    with torch.no_grad():
        out = fn(q, q, v, p).float()[:, :, s // 2:, 0]   # rows with >= 512 keys
    return 1.0 - out.mean().item() * (1.0 - p)


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    rows = []
    for name, fn in KERNELS.items():
        for p in (0.0, 0.1, 0.125):
            try:
                rate = drop_rate(fn, p) if p else 0.0
                ms = {}
                for shape, (b, h, s, d) in SHAPES.items():
                    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                               for _ in range(3))
                    ms[shape] = timed(fn, q, k, v, p)
                rows.append((name, p, rate, ms))
            except Exception as e:   # noqa: BLE001 - a kernel refusing a case is a result
                rows.append((name, p, None, str(e).splitlines()[0][:90]))
    print("| kernel | p | effective p | " + " | ".join(f"{s} fwd+bwd ms" for s in SHAPES) + " |")
    for name, p, rate, ms in rows:
        if rate is None:
            print(f"| {name} | {p} | refused: {ms} |")
        else:
            print(f"| {name} | {p} | {rate:.4f} | " + " | ".join(f"{ms[s]:.3f}" for s in SHAPES) + " |")


if __name__ == "__main__":
    main()
