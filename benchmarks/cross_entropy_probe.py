"""Is the loss's cross entropy at bandwidth? Inductor's kernels against gpt3d's Triton kernels.

Why: the 2026-12-06 session-34 profiles (benchmarks/RESULTS.md) put 7.3 ms of a 71 ms 125M step (16 x 2048
tokens, 50,304 columns, 3.3 GB of bf16 logits) in the loss: the forward log-sum-exp at ~1.1 TB/s and the
backward at ~1.65 TB/s, where a pass at ~3 TB/s would take ~3.3 ms in all. This times the per-token loss's
forward + backward over [N, V] bf16 logits, as gpt3d's TP=1 path computes it:

  compiled  torch.compile of gpt3d's F.cross_entropy on the upcast logits (`_dense_cross_entropy`; gpt3d's
            TP=1 GPU loss before the Triton kernels; in training the whole-chunk graph fused the same ops)
  triton    gpt3d's custom ops (`dense_ce_forward`, `dense_ce_backward_`, what training calls) running
            gpt3d/parallel/cross_entropy_triton.py's kernels: the forward one program per row, a running max
            and rescaled running sum (one exp per element), loss and log-sum-exp in fp32; the backward
            (exp(x - lse) - onehot) * grad in the logits' dtype over the logits, padded columns 0

and prints each one's milliseconds, its bandwidth over the bytes it must move, and how far the Triton loss and
gradient are from the compiled ones. --block/--warps sweep the kernels' launch shape.

    python benchmarks/cross_entropy_probe.py [--shapes 125M 1.3B llama] [--block 4096] [--warps 8]
    TRITON_INTERPRET=1 python benchmarks/cross_entropy_probe.py --check-cpu   # the kernels' arithmetic on CPU
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpt3d.parallel import cross_entropy as CE   # noqa: E402
from gpt3d.parallel import cross_entropy_triton as K   # noqa: E402

SHAPES = {   # tokens per step, real vocabulary, padded columns (make_vocab_size_divisible_by 128)
    "125M": (16 * 2048, 50257, 50304),
    "1.3B": (8 * 2048, 50257, 50304),
    "2.7B": (4 * 2048, 50257, 50304),
    "llama": (4 * 2048, 128256, 128256),
}


class TritonCrossEntropy(torch.autograd.Function):
    """Per-token loss [N] of logits [N, V_pad] (columns >= v_real are padding) against targets [N], through the
    kernels themselves (gpt3d/parallel/cross_entropy_triton.py), not the custom ops (CPU interpreter runs)."""

    @staticmethod
    def forward(ctx, logits, target, v_real):
        loss, lse = K.forward(logits, target, v_real)
        ctx.save_for_backward(logits, target, lse)
        ctx.v_real = v_real
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse = ctx.saved_tensors
        K.backward_(logits, target, lse, grad_loss.float().contiguous(), ctx.v_real)   # over the logits
        return logits, None, None


def _both(fn, logits, target, v_real):
    """Loss and the logits' gradient of the mean loss (what training's backward hands the loss). The loss gets a
    copy of the logits, as gpt3d's gets the head's output: the Triton backward writes the gradient over it."""
    x = logits.detach().requires_grad_(True)
    loss = fn(x.clone(), target, v_real)
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
        K.BLOCK = block
        want_loss, want_grad = _both(_dense_cross_entropy, logits, target, v_real)   # gpt3d's, eager
        got_loss, got_grad = _both(TritonCrossEntropy.apply, logits, target, v_real)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2, atol=1e-4)
        assert torch.all(got_grad[:, v_real:] == 0)
        ref_loss, ref_grad = _both(lambda x, t, v: CE.dense_ce_forward(x, t, v)[0], logits, target, v_real)
        torch.testing.assert_close(ref_loss, want_loss, rtol=1e-5, atol=1e-5)   # the custom ops' CPU reference
        torch.testing.assert_close(ref_grad.float(), want_grad.float(), rtol=1e-2, atol=1e-4)
        print(f"CHECK n={n} v={v_real}/{v_pad} block={block}: loss and gradient match gpt3d's loss")
    K.BLOCK = 64
    for dtype in (torch.float16, torch.float32):   # other logits dtypes, targets outside the vocabulary, no rows
        logits = (torch.randn(6, 200) * 4).to(dtype)
        target = torch.tensor([0, 196, -1, 197, 10**9, 5])
        loss, _ = K.forward(logits, target, 197)
        want, _ = CE.dense_ce_forward(logits, target, 197)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert bool(torch.isnan(loss[[2, 3, 4]]).all())
        empty = logits[:0]
        assert K.forward(empty, target[:0], 197)[0].numel() == 0
        K.backward_(empty, target[:0], torch.empty(0), torch.empty(0), 197)
        print(f"CHECK {dtype}: loss matches the op's reference, NaN for targets outside the vocabulary, 0 rows")


def _timed(fn, logits, target, v_real: int):
    """(forward ms, forward + backward ms, loss, gradient) of the compiled loss, the gradient of the mean."""
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


def _timed_ops(logits, target, v_real: int):
    """The same for gpt3d's custom ops: the forward op, then the in-place backward op alone on a scratch copy
    of the logits (its time does not depend on the values it overwrites); values from autograd on a copy."""
    from cuda_timing import median_ms
    fwd = median_ms(lambda: CE.dense_ce_forward(logits, target, v_real))
    loss, lse = CE.dense_ce_forward(logits, target, v_real)
    grad = torch.full_like(loss, 1.0 / loss.numel())
    scratch = logits.clone()
    bwd = median_ms(lambda: torch.ops.gpt3d.dense_ce_backward_(scratch, target, lse, grad, v_real))
    got_loss, got_grad = _both(lambda x, t, v: CE.dense_ce_forward(x, t, v)[0], logits, target, v_real)
    return fwd, fwd + bwd, got_loss, got_grad


def bench(shapes: list[str]) -> None:
    compiled = torch.compile(CE._dense_cross_entropy, dynamic=False)   # gpt3d's loss before the Triton kernels
    assert CE._TRITON, "gpt3d's loss ops have no Triton kernels here"
    print(torch.cuda.get_device_name(), torch.__version__, "triton", triton.__version__)
    for name in shapes:
        n, v_real, v_pad = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        logits = (torch.randn(n, v_pad, device="cuda", generator=g) * 3).to(torch.bfloat16)
        target = torch.randint(0, v_real, (n,), device="cuda", generator=g)
        moved = {"forward": n * v_real * 2, "backward": n * v_real * 2 + n * v_pad * 2}
        got = {}
        for label in ("compiled", "triton"):
            fwd, both, loss, grad = _timed(compiled, logits, target, v_real) if label == "compiled" else \
                _timed_ops(logits, target, v_real)
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
    ap.add_argument("--block", type=int, default=K.BLOCK)
    ap.add_argument("--warps", type=int, default=K.WARPS)
    ap.add_argument("--check-cpu", action="store_true", help="with TRITON_INTERPRET=1: the arithmetic on CPU")
    a = ap.parse_args()
    if a.check_cpu:
        check_cpu()
        return
    K.BLOCK, K.WARPS = a.block, a.warps
    bench(a.shapes)


if __name__ == "__main__":
    main()
