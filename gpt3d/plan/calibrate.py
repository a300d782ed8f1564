"""`gpt3d plan --calibrate`: measure gpt3d's own kernels on this GPU, at the config's shape.

Why its own module: time predictions should use the speed this GPU reaches on
gpt3d's code, not datasheet peaks. Measured at TP=1 and the config's micro-batch:
the layer's matmuls (forward and backward shapes), fused causal attention, a
two-layer model chunk compiled whole as training compiles it (the rest of its
time is the elementwise work), the embedding + output layer + loss chunk, and the
optimizer step. Each becomes one rate of presets.Calibration.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import Optional
from collections.abc import Callable

import torch

from ..config import Config
from ..errors import ConfigError
from .layout import layout_of
from .memory import layer_terms, shape_of
from .presets import (ATTN_BACKWARD_FACTOR, EW_PASSES, GEMM_OVERHEAD_S, LOSS_PASSES, Calibration,
                      attention_efficiency)
from .search import vocab_of
from ..perf.flops import layer_flops, layer_linears


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def _gemm_seconds(m, T: int, dtype, warmup: int, iters: int, device: torch.device) -> tuple[float, int]:
    """The layer's matmuls, forward (x W^T) and backward (dy W, dy^T x), at TP=1; and how many there are."""
    shapes = [(o, i) for i, o in layer_linears(m, 1)]   # (out, in): the weights' shapes
    mats = [(torch.randn(T, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype),
             torch.randn(T, n, device=device, dtype=dtype)) for n, k in shapes]

    def run():
        for x, w, dy in mats:
            torch.mm(x, w.t())
            torch.mm(dy, w)
            torch.mm(dy.t(), x)
    return _seconds(run, warmup, iters, device), 3 * len(shapes)


def _attention_seconds(m, b: int, s: int, dtype, warmup: int, iters: int, device: torch.device) -> float:
    from ..model.attention import sdpa_backend_context
    q = torch.randn(b, m.num_attention_heads, s, m.head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, m.kv_heads, s, m.head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    gqa = m.kv_heads != m.num_attention_heads

    def run():
        with sdpa_backend_context(m.attention_backend, q.device):
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        y.backward(torch.ones_like(y))
    return _seconds(run, warmup, iters, device)


def _chunk_seconds(cfg: Config, layer_ids: list, pre: bool, post: bool, warmup: int, iters: int,
                   device: torch.device, compile: bool = True, hooks: bool = False) -> tuple[float, Optional[float]]:
    """One training forward + backward of a GPTModel chunk, compiled whole as `gpt3d train` does at TP=DP=1
    (the loss chunk runs eager: its cross entropy is a compiled kernel either way, the rest is two GEMMs);
    with `hooks`, also the gradient hooks' speed over the chunk's parameters in GB/s (a bf16 gradient added
    into an fp32 buffer: 10 bytes per element)."""
    from ..model.attention import sdpa_backend_context
    from ..model.build import compile_chunks
    from ..model.gpt import GPTModel
    from ..parallel.random import seed_everything
    from ..parallel.state import ParallelState
    m, b = dataclasses.replace(cfg.model, recompute_granularity=None), cfg.training.micro_batch_size
    ps = ParallelState.single(device)   # recompute is the time model's own term, not part of the layer's rate
    chunk = GPTModel(m, ps, seed_everything(1, ps), vocab_size=vocab_of(cfg), layer_ids=layer_ids, pre_process=pre,
                     post_process=post)
    chunk.init_weights(1)
    chunk.cast_parameters(torch.bfloat16)
    if compile:
        compile_chunks([chunk], ps, "chunk")
    tokens = torch.randint(0, vocab_of(cfg), (b, m.seq_length + 1), device=device)
    hidden = torch.randn(b, m.seq_length, m.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    pairs = [(torch.zeros(p.shape, device=device), torch.ones_like(p)) for p in chunk.parameters()] if hooks else []

    def run():
        with sdpa_backend_context(m.attention_backend, hidden.device):
            if post:
                y = chunk(tokens[:, :-1], tokens[:, 1:]).float().mean()
                y.backward()
            else:
                y = chunk(None, None, hidden=hidden)
                y.backward(torch.ones_like(y))
        for p in chunk.parameters():
            p.grad = None

    def add_grads():
        for main, grad in pairs:
            main.add_(grad)
    try:
        hook_gbps = 10 * sum(g.numel() for _, g in pairs) / _seconds(add_grads, warmup, iters, device) / 1e9 \
            if hooks else None
        return _seconds(run, warmup, iters, device), hook_gbps
    finally:
        chunk = pairs = None   # releases the model the closure holds
        torch._dynamo.reset()
        gc.collect()


def _optimizer_ns_per_param(cfg: Config, warmup: int, iters: int, device: torch.device, n: int) -> float:
    """clip + the AdamW step (which writes the bf16 parameters) over ~100M fp32 master elements."""
    from ..optim.grad_buffer import GradBuffer
    from ..optim.zero import ZeroOptimizer
    from ..parallel.state import ParallelState
    ps = ParallelState.single(device)
    layer = torch.nn.Linear(10_000, n // 10_000, bias=False, device=device, dtype=torch.bfloat16)
    grads = GradBuffer([layer], ps)
    opt = ZeroOptimizer(grads, cfg.optimizer, ps)
    for p in layer.parameters():
        p.main_grad.normal_()
    try:   # the median of three runs: one slow run (clock ramp, a neighbour) must not set the rate
        runs = sorted(_seconds(lambda: opt.step(1e-4), warmup, iters, device) for _ in range(3))
        return runs[1] / n * 1e9
    finally:
        opt = grads = layer = None   # releases the optimizer's masters and the layer before the next measurement
        gc.collect()   # the optimizer's gradient hooks make a reference cycle with the parameters


def calibrate(cfg: Config, *, warmup: int = 3, iters: int = 10, verbose: bool = False,
              device: str = "cuda", optimizer_params: int = 100_000_000) -> Calibration:
    """Kernel speeds at `cfg`'s shape and micro-batch on the current CUDA device (bf16). `device="cpu"` only
    exercises the code."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--calibrate measures on a CUDA device; none is visible")
    dev = torch.device(device)
    m, b, s = cfg.model, cfg.training.micro_batch_size, cfg.model.seq_length
    dtype = torch.bfloat16
    lay = layout_of(cfg, 1)
    sh = shape_of(m, lay, 2)
    gemm_flops, attn_flops = layer_flops(m, lay, sh)
    gemm_s, n_gemm = _gemm_seconds(m, b * s, dtype, warmup, iters, dev)
    attn_s = _attention_seconds(m, b, s, dtype, warmup, iters, dev)
    two_layers_s, grad_gbps = _chunk_seconds(cfg, [0, 1], False, False, warmup, iters, dev, hooks=True)
    layer_s = two_layers_s / 2
    ew_s = max(layer_s - gemm_s - attn_s, 0.05 * layer_s)
    head_s, _ = _chunk_seconds(cfg, [], True, True, warmup, iters, dev, compile=False)
    from ..parallel.layout import padded_vocab_size
    pv = padded_vocab_size(vocab_of(cfg), m.make_vocab_size_divisible_by, 1)
    gemm_tflops = 3 * gemm_flops / max(gemm_s - n_gemm * GEMM_OVERHEAD_S, 0.5 * gemm_s) / 1e12
    head_gemm_s = 6 * b * s * m.hidden_size * pv / (gemm_tflops * 1e12) + 3 * GEMM_OVERHEAD_S
    ew_gbps = EW_PASSES * layer_terms(m, lay, sh, True, None).total / ew_s / 1e9
    embedding_s = (2 * pv * m.hidden_size + 8 * b * s * m.hidden_size) / (ew_gbps * 1e9)   # as timing.py counts it
    loss_s = max(head_s - head_gemm_s - embedding_s, 0.05 * head_s)
    opt_ns = _optimizer_ns_per_param(cfg, warmup, iters, dev, optimizer_params)
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    cal = Calibration(gemm_tflops=gemm_tflops,
                      attn_tflops=(1 + ATTN_BACKWARD_FACTOR) * attn_flops / attn_s
                      / attention_efficiency(s, m.head_dim) / 1e12,
                      ew_gbps=ew_gbps, loss_gbps=LOSS_PASSES * 2 * b * s * pv / loss_s / 1e9,
                      optimizer_ns_per_param=opt_ns, grad_gbps=grad_gbps,
                      source=f"measured on {where} at {m.num_layers}L/{m.hidden_size}h micro-batch {b}")
    if verbose:
        print(f"calibration: layer {layer_s * 1e3:.2f} ms (GEMMs {gemm_s * 1e3:.2f}, attention {attn_s * 1e3:.2f}, "
              f"rest {ew_s * 1e3:.2f}), embedding + head + loss {head_s * 1e3:.2f} ms "
              f"(GEMM {head_gemm_s * 1e3:.2f}), gradient hooks {grad_gbps:.0f} GB/s, optimizer {opt_ns:.4f} ns/param",
              flush=True)
    return cal
