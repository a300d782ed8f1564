"""Where does the training step's time go? Variants of gpt3d's step at the bench shapes, one process each.

Run on the GPU machine, e.g.
    python benchmarks/profile_step.py --head --runs llama-1.5B:bf16 llama-1.5B:fp8:8 1.3B:bf16+fce \
        --profile llama-1.5B:bf16 --deadline 540
A run is SHAPE:OPTIONS[:MBS[:MICRO]] (SHAPE: a `gpt3d bench` shape, or 2.7B = 32 layers, 2560 hidden, 32 heads)
with OPTIONS joined by '+':
  bf16 (default) | fp16 | fp8 | fp8row (rowwise recipe) | fp8gw (rowwise_with_gw_hp)
  fp8u (tensorwise, the MLP per linear instead of gpt3d/model/fp8_mlp.py's one function)
  fp8s (tensorwise, a SwiGLU MLP as one function even where quack does not load: enable_fp8's fused_swiglu)
  nq (with fp8: the QKV linear per linear, not gpt3d/model/fp8_qkv.py's function)
  fp8o | fp8r | fp8d | fp8dr (probes, benchmarks/fp8_scaling_probe.py: own casts; per-row amax; delayed; both)
  fce (fused linear + cross entropy, chunked)
  seq1024 | full | selective (recompute) | layer | chunk (compile granularity) | eager | cudnn|flash|efficient|math
  gqaexp (expand K/V heads before SDPA) | ro (compile mode reduce-overhead) | cdt (coordinate-descent tuning)
  ndt (Inductor prefer_nd_tiling) | map (Inductor max_autotune_pointwise)
  nobg (without gpt3d/model/bias_grad.py's functions, which training installs on CUDA in bf16/fp16)
  nolt (GEMMs left to torch: without gpt3d/model/cublaslt.py, which training uses where nvmath-python loads)
  mk (Inductor multi_kernel: wider persistent reductions, benchmarked) | pdl (enable_pdl) | combo (combo_kernels)
  hold (FP8 weights cast once a step even with one micro-batch: model/fp8_weights.py's holds_casts always true)
  nogaf (--no-gradient-accumulation-fusion: weight gradients made apart and added by the buffer's hooks)
  mat (Inductor max_autotune_gemm: cuBLAS or Triton GEMM templates with fused epilogues) | tma (mat + TMA templates)
  lt (cuBLASLt as torch's preferred BLAS library) | nrr (no reduced-precision reductions in half GEMMs)
  drop (hidden and attention dropout 0.1) | hdrop (hidden only) | adrop (attention only)
  h1 (probe: the replicated-dropout hash with one mixing round instead of two; masks differ from gpt3d's)
  gaps (where the GPU idles between kernels in back-to-back steps, and which host op it waits on: `GAPS` lines)
Prints one row per run: ms/iter, tokens/s, MFU, peak GiB, optimizer ms, first step s (compilation included),
attention kernels, wall seconds, host ms per phase (time spent launching: where the step is host-bound);
with --profile, the top CUDA kernels of those runs and their time per step by kind (GEMM, attention, Triton,
optimizer, ...), also written to $OUT. --head first times the output head + loss alone at the Llama shape:
logits then loss, the chunked fused version, Liger's if installed.
Exploratory: the numbers that count come from `gpt3d bench` and go to benchmarks/RESULTS.md.
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
from gpt3d.perf.bench import _config
from gpt3d.commands.bench import add_arguments
from gpt3d.perf.throughput import Throughput
from gpt3d.model.gpt import padded_vocab_size
from gpt3d.parallel.state import ParallelState
import gpt3d.model.build
from gpt3d.train import Trainer
from speed_suite import GPT_2_7B   # benchmarks/, run as `python benchmarks/profile_step.py`

OUT = os.environ.get("OUT", ".")


OPTIONS = {"bf16", "fp16", "fp8", "fp8u", "fp8s", "fp8row", "fp8gw", "fp8d", "fp8r", "fp8dr", "fp8o", "nq", "fce",
           "seq1024", "full", "selective", "layer", "chunk", "eager", "cudnn", "flash", "efficient", "math",
           "gqaexp", "ro", "cdt", "ndt", "map", "nobg", "mk", "pdl", "combo", "mat", "tma", "lt", "nolt", "nrr", "drop",
           "hdrop", "adrop", "h1", "gaps", "hold", "nogaf"}


def build(shape: str, opts: set, mbs=None, micro: int = 1):
    p = argparse.ArgumentParser()
    add_arguments(p)
    model = "custom" if shape == "2.7B" else shape   # 2.7B: issue 25's shape, as speed_suite.py runs it
    argv = ["--model", model] + (GPT_2_7B if shape == "2.7B" else []) + ["--micro-batches", str(micro)]
    argv += ["--micro-batch-size", str(mbs)] if mbs else []
    argv += ["--fp16"] if "fp16" in opts else []
    argv += ["--fp8"] if opts & {"fp8", "fp8u", "fp8s", "fp8row", "fp8gw", "fp8d", "fp8r", "fp8dr", "fp8o"} else []
    kw = {}
    if opts & {"fp8u", "fp8s"}:   # the MLP per linear (torchao's function each) / SwiGLU's as one function too
        kw.update(fused_mlp="fp8s" in opts, fused_swiglu="fp8s" in opts)
    if "nq" in opts:   # the QKV linear per linear (torchao's function) instead of gpt3d/model/fp8_qkv.py's
        kw.update(fused_qkv=False)
    if kw:
        import functools
        gpt3d.model.build.enable_fp8 = functools.partial(gpt3d.model.build.enable_fp8, **kw)
    if opts & {"fp8d", "fp8r", "fp8dr", "fp8o"}:   # probes: delayed scaling, per-row-then-global amax
        from fp8_scaling_probe import install
        install(delayed=bool(opts & {"fp8d", "fp8dr"}), rowamax=bool(opts & {"fp8r", "fp8dr"}))
    argv += ["--fp8-recipe", "rowwise"] if "fp8row" in opts else []
    argv += ["--fp8-recipe", "rowwise_with_gw_hp"] if "fp8gw" in opts else []
    argv += ["--cross-entropy-loss-fusion"] if "fce" in opts else []
    argv += ["--seq-length", "1024"] if "seq1024" in opts else []
    argv += ["--recompute-granularity", "full"] if "full" in opts else []
    argv += ["--recompute-granularity", "selective"] if "selective" in opts else []
    argv += ["--no-compile"] if "eager" in opts else []
    for b in ("cudnn", "flash", "efficient", "math"):
        argv += ["--attention-backend", b] if b in opts else []
    cfg = _config(model, p.parse_args(argv))
    if "gqaexp" in opts:   # K/V repeated to every query head, so SDPA sees plain multi-head attention
        import torch.nn.functional as F
        from gpt3d.model.attention import SelfAttention

        def _sdpa(self, q, k, v, p):
            if self.kv_heads != self.heads:
                k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
                v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        SelfAttention._sdpa = _sdpa
    import torch._inductor.config as ic
    if opts & {"cdt", "ndt", "map"}:
        ic.coordinate_descent_tuning = "cdt" in opts
        ic.triton.prefer_nd_tiling = "ndt" in opts   # 2-D tiles for the transposing casts
        ic.max_autotune_pointwise = "map" in opts    # autotune pointwise/reduction kernels' block sizes
    if "mk" in opts:       # persistent reductions up to 16x wider, each benchmarked against the looped one
        ic.triton.multi_kernel = 1
    if "pdl" in opts:      # programmatic dependent launch for Inductor's Triton kernels (Hopper)
        ic.triton.enable_pdl = True
    if "combo" in opts:    # independent kernels of a graph launched as one (horizontal fusion)
        ic.combo_kernels = True
    if opts & {"mat", "tma"}:   # GEMMs autotuned between cuBLAS and Triton templates, which can take the bias,
        ic.max_autotune_gemm = True   # GeLU and its backward as epilogues (each fusion benchmarked)
        ic.max_autotune_gemm_backends = "ATEN,TRITON"
        ic.triton.enable_persistent_tma_matmul = "tma" in opts   # Hopper's TMA persistent templates too
    if "lt" in opts:   # probes for fp16's GEMM gap (benchmarks/gemm_dtype_probe.py)
        torch.backends.cuda.preferred_blas_library("cublaslt")
    if "nrr" in opts:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    if "drop" in opts or "hdrop" in opts:
        cfg.model.hidden_dropout = 0.1
    if "drop" in opts or "adrop" in opts:
        cfg.model.attention_dropout = 0.1
    for g in ("layer", "chunk"):
        if g in opts:
            cfg.training.compile_granularity = g
    if "h1" in opts:
        import gpt3d.parallel.random as R

        def one_round(i, k1, k2):
            if i.dtype == torch.int64:
                return R._mix32(R._as_int32(i & R._M32) ^ k1 ^ R._as_int32(i >> 32))
            return R._mix32(i ^ k1)
        R.hash_index = one_round
    if "hold" in opts:   # FP8 weights cast once a step even with one micro-batch (model/fp8_weights.py)
        import gpt3d.train.step as S
        S.holds_casts = lambda num_micro, recompute: True
    if "ro" in opts:
        compile_chunks = gpt3d.model.build.compile_chunks

        def _compile(chunks, ps, granularity="auto", **kw):
            compile_chunks(chunks, ps, granularity, mode="reduce-overhead", **kw)
        gpt3d.model.build.compile_chunks = _compile   # build_model_chunks calls it by this name
    cfg.model.bias_grad_fusion = "nobg" not in opts
    cfg.model.gemm_tuning = "nolt" not in opts
    cfg.model.no_gradient_accumulation_fusion = "nogaf" in opts
    tr = Trainer(cfg, ParallelState.single(torch.device("cuda")))
    from gpt3d.model import bias_grad, cublaslt
    fused = [m for c in tr.model for x in c.modules() for m in (getattr(x, "_fused", None),
                                                                getattr(x, "_fused_qkv", None))]
    n = sum(isinstance(m, (bias_grad.FusedGeluMLP, bias_grad.FusedQKV)) for m in fused)
    n_lt = sum(getattr(m, "lt", False) for m in fused)
    linears = sum(getattr(x, "_matmul", None) is cublaslt.linear for c in tr.model for x in c.modules())
    print(f"bias-gradient fusions installed: {n} (Triton {'loaded' if bias_grad.TRITON else 'missing'}); "
          f"through cuBLASLt: {n_lt} fused functions, {linears} linears "
          f"(nvmath-python {'loaded' if cublaslt.LOADED else 'missing'}); weights accumulating in backward: "
          f"{len(tr.grads.fused())}")
    return cfg, tr


def time_variant(run: str, warmup: int, iters: int, profile: bool) -> dict:
    parts = run.split(":")
    shape, opts = parts[0], set(parts[1].split("+")) if len(parts) > 1 else {"bf16"}
    mbs = int(parts[2]) if len(parts) > 2 else None
    micro = int(parts[3]) if len(parts) > 3 else 1
    t_start = time.time()
    cfg, tr = build(shape, opts, mbs, micro)
    m, seq, v = cfg.training.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size
    text = torch.randint(0, v, (micro, m, seq + 1), device="cuda")
    batch = [{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in text]
    t_first = None
    for _ in range(warmup):
        tr.train_step(batch)
        if t_first is None:
            torch.cuda.synchronize()
            t_first = time.time() - t_start
    torch.cuda.synchronize()
    t_ready = time.time()
    torch.cuda.reset_peak_memory_stats()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        e0.record()
        tr.train_step(batch)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    host = _time_phases(tr)
    t0 = time.perf_counter()
    for _ in range(iters):   # back to back, no sync between steps (what training does)
        tr.train_step(batch)
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / iters
    host_ms = {k: round(v[0] * 1e3 / iters, 2) for k, v in host.items()}
    host.clear()   # the wrappers stay but stop mattering: later steps add to a dict nobody reads
    mem = torch.cuda.max_memory_allocated() / 2 ** 30
    opt_ms = 0.0
    for _ in range(3):   # zero gradients (direct gradients are gone after a step: these are zeros of their own)
        tr.grads.zero_grad()
        tr.grads.finish_grad_sync()
        e0.record()
        tr.optimizer.step(1e-4)
        e1.record()
        torch.cuda.synchronize()
        opt_ms += e0.elapsed_time(e1) / 3
    tp = Throughput(cfg.model, v, padded_vocab_size(v, 128, 1), m * micro, 1, 989.0)
    times.sort()
    row = {"run": run, "ms": sec * 1e3, "ms_min_synced": times[0] * 1e3, "ms_med_synced": times[len(times) // 2] * 1e3,
           "opt_ms": opt_ms, "host_ms": host_ms, "mem": mem, "setup_s": t_ready - t_start, "first_s": t_first,
           **tp.report(sec)}
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CUDA]) as pr:
        for _ in range(2 if profile else 1):
            tr.train_step(batch)
        torch.cuda.synchronize()
    ka = pr.key_averages()
    kinds = kernel_kinds(ka, steps=2 if profile else 1)
    row["gpu_ms"] = sum(kinds.values())   # kernels alone, per step
    row["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)   # caching allocator frees + retries
    row["attn_kernels"] = sorted({e.key[:60] for e in ka if any(
        w in e.key.lower() for w in ("flash", "cudnn", "fmha", "attention", "sdpa", "efficient"))})[:3]
    if "gaps" in opts:
        for line in gap_report(tr, batch):
            print("GAPS " + run + " " + line)
    if profile:
        table = ka.table(sort_by="cuda_time_total", row_limit=120, max_name_column_width=110)
        row["kinds_ms"] = kinds
        with open(os.path.join(OUT, f"prof_{run.replace(':', '_').replace('+', '-')}.txt"), "w") as fh:
            fh.write(table + "\n" + json.dumps(kinds, indent=1))
        print(table[:5000])
        print("per step by kind (ms):", json.dumps(kinds))
    return row


def gap_report(tr, batch, steps: int = 2) -> list[str]:
    """Idle time of the GPU between its kernels over `steps` back-to-back steps, split by whether the host had
    not yet started launching the kernel that ended the gap (host-late: the GPU waited on Python/dispatch),
    with the host-late time by the outermost and innermost CPU ops around that launch."""
    import bisect
    import tempfile
    from torch.profiler import ProfilerActivity, profile as prof
    tr.train_step(batch)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        for _ in range(steps):
            tr.train_step(batch)
        torch.cuda.synchronize()
    path = os.path.join(tempfile.gettempdir(), "gaps_trace.json")
    pr.export_chrome_trace(path)
    with open(path) as fh:
        ev = json.load(fh)["traceEvents"]
    gpu = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                 key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")
              and "correlation" in e.get("args", {})}   # Triton/Inductor kernels launch through the driver API
    ops: dict = {}
    for e in ev:
        if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e:
            ops.setdefault(e["tid"], []).append(e)
    ops = {t: sorted(v, key=lambda o: o["ts"]) for t, v in ops.items()}
    starts = {t: [o["ts"] for o in v] for t, v in ops.items()}
    busy = gpu[0]["ts"] + gpu[0]["dur"] if gpu else 0
    total = late = 0.0
    by: dict = {}
    for k in gpu[1:]:
        gap = k["ts"] - busy
        if gap > 1.0:
            total += gap
            ln = launch.get(k.get("args", {}).get("correlation"))
            if ln is not None and ln["ts"] > busy:   # the host began this launch after the GPU went idle
                wait = min(gap, ln["ts"] - busy)
                late += wait
                t = ln["tid"]
                i = bisect.bisect_right(starts.get(t, []), ln["ts"])
                around = [o for o in ops.get(t, [])[max(0, i - 3000):i] if o["ts"] + o["dur"] >= ln["ts"]]
                key = (around[0]["name"][:60], around[-1]["name"][:50]) if around else ("?", "?")
                by[key] = by.get(key, 0.0) + wait
        busy = max(busy, k["ts"] + k["dur"])
    span = (busy - gpu[0]["ts"]) / steps if gpu else 0.0
    out = [f"per step: span {span / 1e3:.1f} ms, kernels {len(gpu) / steps:.0f}, idle {total / steps / 1e3:.2f} ms, "
           f"of it host-late {late / steps / 1e3:.2f} ms"]
    for (outer, inner), t in sorted(by.items(), key=lambda kv: -kv[1])[:14]:
        out.append(f"  {t / steps / 1e3:7.2f} ms  {outer}  >  {inner}")
    blocking: dict = {}   # host calls that wait on the GPU (or copy from pageable memory), by the ops around them
    for e in ev:
        # stream/event synchronisations and copies (pageable ones wait for the stream); not the device-wide
        # synchronisation that ends the profiled steps
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e and e["name"] != "cudaDeviceSynchronize" \
                and any(w in e["name"] for w in ("Synchronize", "Memcpy")):
            t = e["tid"]
            i = bisect.bisect_right(starts.get(t, []), e["ts"])
            around = [o for o in ops.get(t, [])[max(0, i - 3000):i] if o["ts"] + o["dur"] >= e["ts"]]
            shown = around if len(around) <= 4 else around[:2] + around[-2:]
            key = (e["name"], " > ".join(o["name"][:40] for o in shown) if around else "?")
            n, d = blocking.get(key, (0, 0.0))
            blocking[key] = (n + 1, d + e["dur"])
    for (name, where), (n, d) in sorted(blocking.items(), key=lambda kv: -kv[1][1])[:12]:
        out.append(f"  host {name} x{n / steps:g}/step {d / steps / 1e3:.2f} ms/step in {where}")
    return out


def _time_phases(tr) -> dict:
    """Host seconds spent launching each phase of the step (forward+backward, gradient sync, optimizer), with no
    synchronisation: where the step is host-bound, these say which phase's launches the GPU waits for."""
    acc: dict = {}
    for owner, name, label in ((tr.step, "_forward_backward", "fwd_bwd"), (tr.step.grads, "finish_grad_sync", "sync"),
                               (tr.step.optimizer, "step", "optimizer"), (tr.step.grads, "zero_grad", "zero_grad")):
        fn = getattr(owner, name)
        acc[label] = [0.0]

        def timed(*a, _fn=fn, _cell=acc[label], **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                _cell[0] += time.perf_counter() - t
        setattr(owner, name, timed)
    return acc


KINDS = [   # (kind, substrings of a kernel's name, lower case): the first match names a kernel's kind
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas", "matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "norm_kernel")),
    ("triton", ("triton",)),
    ("copy/cast", ("copy", "cast", "elementwise", "vectorized", "unrolled", "fill")),
    ("reduce", ("reduce",)),
]


def kernel_kinds(ka, steps: int) -> dict:
    """CUDA time per step (ms) of the profiled kernels, grouped by KINDS; the rest is `other`."""
    out: dict = {}
    for e in ka:
        t = getattr(e, "device_time_total", None)
        t = e.cuda_time_total if t is None else t
        if not t:
            continue
        name = e.key.lower()
        kind = next((k for k, words in KINDS if any(w in name for w in words)), "other")
        out[kind] = out.get(kind, 0.0) + t / 1e3 / steps
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def head_bench(ns=(8192, 16384), h=2048, v=128256) -> None:
    """Output projection + loss, forward and backward, at the Llama head shape."""
    import torch.nn.functional as F
    from gpt3d.parallel.cross_entropy import _fused_dense, linear_cross_entropy
    ps = ParallelState.single(torch.device("cuda"))
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as Liger
    except Exception as e:  # noqa: BLE001 - liger is optional: any import failure means "not available"
        print("liger unavailable:", str(e)[:100])
        Liger = None
    rows = []
    for n in ns:
        x0 = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
        w0 = (torch.randn(v, h, device="cuda") * 0.02).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device="cuda")
        # the candidates below are built and run within this iteration, so their closures see this n's t
        cands = {"logits+compiled CE": lambda x, w: _fused_dense(F.linear(x, w), t, v).mean()}  # noqa: B023
        for c in (1024, 2048, 4096):
            cands[f"fused chunk {c}"] = (lambda c: lambda x, w: linear_cross_entropy(x, w, t, v, ps, c).mean())(c)  # noqa: B023
        comp = torch.compile(lambda x, w: linear_cross_entropy(x, w, t, v, ps).mean())  # noqa: B023
        cands["fused default, compiled"] = comp
        if Liger is not None:
            cands["liger fp32 accum"] = lambda x, w: Liger.apply(x, w, t, None, None, -100, 0.0, 0.0, "mean", None,  # noqa: B023
                                                                 False, torch.float32)
            cands["liger bf16 accum"] = lambda x, w: Liger.apply(x, w, t, None, None, -100, 0.0, 0.0, "mean")  # noqa: B023
        ref = None
        for name, fn in cands.items():
            try:
                x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
                for _ in range(2):
                    x.grad = w.grad = None
                    out = fn(x, w)
                    out = out[0] if isinstance(out, tuple) else out
                    out.backward()
                torch.cuda.synchronize()
                got = (out.detach().float(), x.grad.float(), w.grad.float())
                if ref is None:
                    ref = got
                err = [float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(got, ref)]
                gc.collect()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ts = []
                for _ in range(7):
                    x.grad = w.grad = None
                    e0.record()
                    out = fn(x, w)
                    (out[0] if isinstance(out, tuple) else out).backward()
                    e1.record()
                    e1.synchronize()
                    ts.append(e0.elapsed_time(e1))
                extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
                ts.sort()
                rows.append((n, name, ts[3], extra, err))
            except Exception as e:  # noqa: BLE001 - a candidate that fails (OOM, unsupported) is its row
                rows.append((n, name, float("nan"), float("nan"), [str(e)[:80]]))
            print(rows[-1], flush=True)
        del x0, w0
    print(f"\n{'tokens':>7} {'head+loss variant':<26}{'ms':>8}{'peak+GiB':>10}  rel.err (loss, dx, dw)")
    for n, name, ms, extra, err in rows:
        print(f"{n:>7} {name:<26}{ms:>8.2f}{extra:>10.2f}  {err}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=[], help="SHAPE:OPTIONS[:MBS[:MICRO]], e.g. 1.3B:fp8:8")
    ap.add_argument("--profile", nargs="*", default=[], help="runs to profile")
    ap.add_argument("--iters", type=int, default=20,
                    help="timed steps (6 left ~0.5-1%% between runs of one tree: RESULTS.md, session 32)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--head", action="store_true", help="output head + loss micro-benchmark first")
    ap.add_argument("--deadline", type=float, default=1e9, help="start no run after this many seconds")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-this", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for run in a.runs + a.profile:   # a misspelt option would otherwise time the default silently
        unknown = set(run.split(":")[1].split("+")) - OPTIONS if ":" in run else set()
        if unknown:
            raise SystemExit(f"{run}: unknown option(s) {', '.join(sorted(unknown))} (the docstring lists them)")
    torch.backends.cuda.matmul.allow_tf32 = True
    t_begin = time.time()
    if a.one:
        try:
            r = time_variant(a.runs[0], a.warmup, a.iters, a.profile_this)
        except torch.cuda.OutOfMemoryError:
            r = {"run": a.runs[0], "error": "OOM"}
        print("ROW " + json.dumps(r), flush=True)
        return
    print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name(), flush=True)
    if a.head:
        head_bench(ns=(8192,))
    rows = []
    for run in a.runs:
        if time.time() - t_begin > a.deadline:
            rows.append({"run": run, "error": "skipped (deadline)"})
            continue
        t0 = time.time()
        cmd = [sys.executable, __file__, "--one", "--runs", run, "--iters", str(a.iters), "--warmup", str(a.warmup)]
        if run in a.profile:
            cmd.append("--profile-this")
        proc = subprocess.run(cmd, capture_output=True, text=True)   # one process per run: clean peaks
        with open(os.path.join(OUT, "runs.log"), "a") as fh:
            fh.write(f"=== {run}\n{proc.stdout}\n{proc.stderr[-6000:]}\n")
        sys.stdout.write("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("ROW "))[:3000] + "\n")
        got = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        r = json.loads(got[0]) if got else {"run": run, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
        r["wall_s"] = time.time() - t0
        rows.append(r)
        print(json.dumps(r), flush=True)
    with open(os.path.join(OUT, "rows.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"\n{'run':<30}{'ms':>8}{'synced':>8}{'opt':>6}{'tok/s':>10}{'MFU':>7}{'GiB':>6}{'1st s':>6}{'gpu':>6}"
          f"{'wall':>6}  attention")
    for r in rows:
        if "ms" in r:
            print(f"{r['run']:<30}{r['ms']:>8.1f}{r['ms_med_synced']:>8.1f}{r['opt_ms']:>6.1f}{r['tokens_per_s']:>10,.0f}"
                  f"{r['mfu']:>7.1%}{r['mem']:>6.1f}{r['first_s'] or 0:>6.1f}{r['gpu_ms']:>6.1f}{r['wall_s']:>6.0f}"
                  f"  {r['attn_kernels'][:1]}  host {r.get('host_ms')}")
        else:
            print(f"{r['run']:<30} {r.get('error')}  {r.get('wall_s', 0):.0f}s")


if __name__ == "__main__":
    main()
