"""Where does the training step's time go? Variants of gpt3d's step at the bench shapes, one process.

Run on the GPU machine: `python benchmarks/profile_step.py --shapes 125M 1.3B --variants base cudnn ...`.
Prints one row per (shape, variant): ms/iter, tokens/s, MFU, peak GiB, and the optimizer's share; with
--profile, the top CUDA kernels of the last variant. Exploratory: the numbers that count come from
`gpt3d bench`, and go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpt3d.bench import VOCAB, _config, add_arguments  # noqa: E402
from gpt3d.metrics import Throughput  # noqa: E402
from gpt3d.model.gpt import padded_vocab_size  # noqa: E402
from gpt3d.parallel.state import ParallelState  # noqa: E402
from gpt3d.train import Trainer  # noqa: E402


def build(shape: str, variant: str, mbs=None):
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", shape] + (["--micro-batch-size", str(mbs)] if mbs else []))
    args.compile = variant != "nocompile"
    cfg = _config(shape, args)
    cfg.model.attention_backend = "flash" if variant in ("base", "nocompile") else "cudnn"
    if variant.startswith(("bk-", "eager-")):   # trainer's own compile (or none) with one SDPA backend
        cfg.model.attention_backend = variant.split("-")[1]
        cfg.training.compile = variant.startswith("bk-")
        return cfg, Trainer(cfg, ParallelState.single(torch.device("cuda")))
    if variant == "selective":
        cfg.model.recompute_granularity = "selective"
    if variant == "full":
        cfg.model.recompute_granularity = "full"
    whole = variant.startswith("whole")
    if whole:
        cfg.training.compile = False
    if variant == "wholeflash":
        cfg.model.attention_backend = "flash"
    tr = Trainer(cfg, ParallelState.single(torch.device("cuda")))
    if whole:   # the chunk's whole forward (embedding .. loss) as one graph
        for c in tr.model:
            c.forward = torch.compile(c.forward)
    return cfg, tr


def time_variant(shape: str, variant: str, warmup: int, iters: int, mbs=None, profile: bool = False) -> dict:
    cfg, tr = build(shape, variant, mbs)
    m, seq = cfg.training.micro_batch_size, cfg.model.seq_length
    text = torch.randint(0, VOCAB, (m, seq + 1), device="cuda")
    batch = [{"tokens": text[:, :-1], "labels": text[:, 1:]}]
    for _ in range(warmup):
        tr.train_step(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        tr.train_step(batch)
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / iters
    mem = torch.cuda.max_memory_allocated() / 2 ** 30
    # optimizer alone: clip + fused AdamW + publish, timed with events
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        tr.optimizer.step(1e-4)
    e1.record()
    torch.cuda.synchronize()
    opt_ms = e0.elapsed_time(e1) / 5
    tp = Throughput(cfg.model, VOCAB, padded_vocab_size(VOCAB, 128, 1), m, 1, 989.0)
    row = {"shape": shape, "variant": variant, "mbs": m, "ms": sec * 1e3, "opt_ms": opt_ms, "mem": mem,
           **tp.report(sec)}
    names = {}
    if True:   # which attention kernels ran (one profiled step)
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CUDA]) as pr:
            tr.train_step(batch)
            torch.cuda.synchronize()
        for e in pr.key_averages():
            n = e.key.lower()
            if any(w in n for w in ("flash", "cudnn", "fmha", "attention", "sdpa", "efficient")):
                names[e.key[:70]] = e.count
    row["attn_kernels"] = names
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CUDA]) as pr:
            for _ in range(2):
                tr.train_step(batch)
            torch.cuda.synchronize()
        table = pr.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
        out = os.environ.get("OUT", ".")
        with open(os.path.join(out, f"prof_{shape}_{variant}.txt"), "w") as fh:
            fh.write(table)
        print(table[:6000])
    del tr, batch, text
    torch._dynamo.reset()   # compiled code bakes the SDPA choice in and holds the old model's tensors
    gc.collect()
    torch.cuda.empty_cache()
    torch.backends.cuda.enable_flash_sdp(True)
    return row


def sdpa_micro(shapes=((16, 12, 2048, 64), (8, 16, 2048, 128))) -> None:
    """Causal SDPA forward+backward per backend, bf16, TFLOP/s counted for the causal half."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    for b, h, s, d in shapes:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        flops = 4 * b * h * s * s * d / 2 * 3.5   # fwd 1x + bwd 2.5x, causal half
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    def step():
                        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        y.backward(torch.ones_like(y))
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(10):
                        step()
                    e1.record()
                    torch.cuda.synchronize()
                    ms = e0.elapsed_time(e1) / 10
                print(f"sdpa b{b} h{h} s{s} d{d} {name:<20} {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s", flush=True)
            except RuntimeError as e:
                print(f"sdpa b{b} h{h} s{s} d{d} {name:<20} failed: {str(e).splitlines()[0][:100]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="shape:variant[:mbs], e.g. 1.3B:cudnn")
    ap.add_argument("--profile", nargs="*", default=[], help="runs to profile")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sdpa", action="store_true", help="SDPA backend micro-benchmark first")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-this", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    if not a.one:
        print("cudnn", torch.backends.cudnn.version(), "sdp priority", torch._C._get_sdp_priority_order(), flush=True)
    if a.sdpa:
        sdpa_micro()
    rows = []
    for run in a.runs:
        parts = run.split(":")
        shape, variant = parts[0], parts[1]
        mbs = int(parts[2]) if len(parts) > 2 else None
        t0 = time.time()
        if a.one:
            try:
                r = time_variant(shape, variant, a.warmup, a.iters, mbs, profile=a.profile_this)
            except torch.cuda.OutOfMemoryError:
                r = {"shape": shape, "variant": variant, "error": "OOM"}
            print("ROW " + json.dumps(r), flush=True)
            return
        # one process per run: clean memory peaks and compile caches
        cmd = [sys.executable, __file__, "--one", "--runs", run, "--iters", str(a.iters), "--warmup", str(a.warmup)]
        if run in a.profile:
            cmd.append("--profile-this")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write("\n".join(l for l in proc.stdout.splitlines() if not l.startswith("ROW ")) + "\n")
        got = [l[4:] for l in proc.stdout.splitlines() if l.startswith("ROW ")]
        r = json.loads(got[0]) if got else {"shape": shape, "variant": variant,
                                            "error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr else "?"}
        r["wall_s"] = time.time() - t0
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{'shape':<6}{'variant':<11}{'mbs':>4}{'ms':>9}{'opt ms':>8}{'tok/s':>10}{'MFU':>7}{'GiB':>7}")
    for r in rows:
        if "ms" in r:
            print(f"{r['shape']:<6}{r['variant']:<11}{r['mbs']:>4}{r['ms']:>9.1f}{r['opt_ms']:>8.1f}"
                  f"{r['tokens_per_s']:>10,.0f}{r['mfu']:>7.1%}{r['mem']:>7.1f}  {list(r['attn_kernels'])[:2]}")
        else:
            print(f"{r['shape']:<6}{r['variant']:<11} {r.get('error')}")


if __name__ == "__main__":
    main()
