"""Is the loss's cross entropy at bandwidth? Inductor's kernels against two plain Triton kernels.

Why: the 2026-12-06 session-34 profiles (benchmarks/RESULTS.md) put 7.3 ms of a 71 ms 125M step (16 x 2048
tokens, 50,304 columns, 3.3 GB of bf16 logits) in the loss: the forward log-sum-exp at ~1.1 TB/s and the
backward at ~1.65 TB/s, where a pass at ~3 TB/s would take ~3.3 ms in all. This times the per-token loss's
forward + backward over [N, V] bf16 logits, as gpt3d's TP=1 path computes it:

  compiled  gpt3d/parallel/cross_entropy.py `_fused_dense` (torch.compile of F.cross_entropy on the upcast
            logits; in training the whole-chunk graph fuses the same ops)
  triton    this script's kernels: the forward one program per row, block max then a rescaled running sum
            (one exp per element), the target's logit, loss and log-sum-exp in fp32; the backward
            (exp(x - lse) - onehot) * grad in the logits' dtype, padded columns 0

and prints each one's milliseconds, its bandwidth over the bytes it must move, and how far the Triton loss and
gradient are from the compiled ones. Exploratory: nothing in gpt3d uses these kernels.

    python benchmarks/cross_entropy_probe.py [--shapes 125M 1.3B llama] [--block 4096] [--warps 8]
    TRITON_INTERPRET=1 python benchmarks/cross_entropy_probe.py --check-cpu   # the kernels' arithmetic on CPU
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {   # tokens per step, real vocabulary, padded columns (make_vocab_size_divisible_by 128)
    "125M": (16 * 2048, 50257, 50304),
    "1.3B": (8 * 2048, 50257, 50304),
    "2.7B": (4 * 2048, 50257, 50304),
    "llama": (4 * 2048, 128256, 128256),
}


@triton.jit
def _ce_forward(x_ptr, t_ptr, loss_ptr, lse_ptr, stride, v_real, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    m = -float("inf")
    s = 0.0
    for start in range(0, v_real, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < v_real, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(t_ptr + row)
    picked = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, lse - picked)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_backward(x_ptr, t_ptr, lse_ptr, g_ptr, dx_ptr, stride, v_real, v_pad, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    out = dx_ptr + row * stride
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    target = tl.load(t_ptr + row)
    for start in range(0, v_pad, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < v_real, other=-float("inf")).to(tl.float32)
        p = tl.exp(x - lse)
        d = (p - tl.where(cols == target, 1.0, 0.0)) * g
        d = tl.where(cols < v_real, d, 0.0)
        tl.store(out + cols, d.to(dx_ptr.dtype.element_ty), mask=cols < v_pad)


class TritonCrossEntropy(torch.autograd.Function):
    """Per-token loss [N] of logits [N, V_pad] (columns >= v_real are padding) against targets [N]."""
    block, warps = 4096, 8

    @staticmethod
    def forward(ctx, logits, target, v_real):
        n, v_pad = logits.shape
        loss = torch.empty(n, device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        b, w = TritonCrossEntropy.block, TritonCrossEntropy.warps
        _ce_forward[(n,)](logits, target, loss, lse, logits.stride(0), v_real, BLOCK=b, num_warps=w)
        ctx.save_for_backward(logits, target, lse)
        ctx.v_real = v_real
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse = ctx.saved_tensors
        n, v_pad = logits.shape
        dx = torch.empty_like(logits)
        g = grad_loss.float().contiguous()
        b, w = TritonCrossEntropy.block, TritonCrossEntropy.warps
        _ce_backward[(n,)](logits, target, lse, g, dx, logits.stride(0), ctx.v_real, v_pad, BLOCK=b, num_warps=w)
        return dx, None, None


def _both(fn, logits, target, v_real):
    """Loss and the logits' gradient of the mean loss (what training's backward hands the loss)."""
    x = logits.detach().requires_grad_(True)
    loss = fn(x, target, v_real)
    loss.mean().backward()
    return loss.detach(), x.grad


def check_cpu() -> None:
    """The kernels' arithmetic in Triton's interpreter: loss and gradient against gpt3d's TP=1 loss, run eager
    (gpt3d/parallel/cross_entropy.py `_dense_cross_entropy`: F.cross_entropy on the upcast real columns)."""
    from gpt3d.parallel.cross_entropy import _dense_cross_entropy
    torch.manual_seed(0)
    for n, v_real, v_pad, block in ((5, 300, 304, 64), (3, 1000, 1024, 128), (4, 37, 40, 16)):
        logits = (torch.randn(n, v_pad) * 4).to(torch.bfloat16)
        target = torch.randint(0, v_real, (n,))
        TritonCrossEntropy.block = block
        want_loss, want_grad = _both(_dense_cross_entropy, logits, target, v_real)   # gpt3d's, eager
        got_loss, got_grad = _both(TritonCrossEntropy.apply, logits, target, v_real)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2, atol=1e-4)
        assert torch.all(got_grad[:, v_real:] == 0)
        print(f"CHECK n={n} v={v_real}/{v_pad} block={block}: loss and gradient match gpt3d's loss")


def _timed(fn, logits, target, v_real: int):
    """(forward ms, forward + backward ms, loss, gradient) of `fn` on fresh leaf logits, the gradient of the mean."""
    from cuda_timing import median_ms   # benchmarks/, run as `python benchmarks/<script>.py`
    x = logits.detach().requires_grad_(True)
    fwd = median_ms(lambda: fn(x, target, v_real))
    loss = fn(x, target, v_real)
    grad = torch.full_like(loss, 1.0 / loss.numel())

    def step():
        x.grad = None
        fn(x, target, v_real).backward(grad)
    both = median_ms(step)
    return fwd, both, loss.detach(), x.grad.detach().clone()


def bench(shapes: list[str]) -> None:
    from gpt3d.parallel.cross_entropy import _fused_dense
    print(torch.cuda.get_device_name(), torch.__version__, "triton", triton.__version__)
    for name in shapes:
        n, v_real, v_pad = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        logits = (torch.randn(n, v_pad, device="cuda", generator=g) * 3).to(torch.bfloat16)
        target = torch.randint(0, v_real, (n,), device="cuda", generator=g)
        moved = {"forward": n * v_real * 2, "backward": n * v_real * 2 + n * v_pad * 2}
        got = {}
        for label, fn in (("compiled", _fused_dense), ("triton", TritonCrossEntropy.apply)):
            fwd, both, loss, grad = _timed(fn, logits, target, v_real)
            got[label] = (loss, grad)
            bwd = both - fwd
            print(f"BENCH {name} {label:9s} forward {fwd:.3f} ms ({moved['forward'] / fwd / 1e9:.2f} TB/s), "
                  f"backward {bwd:.3f} ms ({moved['backward'] / bwd / 1e9:.2f} TB/s), both {both:.3f} ms")
        (l0, g0), (l1, g1) = got["compiled"], got["triton"]
        print(f"DIFF {name}: loss max rel {((l1 - l0).abs() / l0.abs()).max().item():.2e}, gradient max abs "
              f"{(g1.float() - g0.float()).abs().max().item():.2e} (largest {g0.float().abs().max().item():.2e}), "
              f"padded columns zero: {bool((g1[:, v_real:] == 0).all())}")
        del logits, got, l0, g0, l1, g1
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["125M", "1.3B", "llama"], choices=list(SHAPES))
    ap.add_argument("--block", type=int, default=TritonCrossEntropy.block)
    ap.add_argument("--warps", type=int, default=TritonCrossEntropy.warps)
    ap.add_argument("--check-cpu", action="store_true", help="with TRITON_INTERPRET=1: the arithmetic on CPU")
    a = ap.parse_args()
    if a.check_cpu:
        check_cpu()
        return
    TritonCrossEntropy.block, TritonCrossEntropy.warps = a.block, a.warps
    bench(a.shapes)


if __name__ == "__main__":
    main()
