"""`gpt3d plan` predicted vs measured on one GPU: activation memory, peak memory and tokens/s.

At the 125M, 1.3B and Llama-1.5B shapes (seq 2048, bf16, compiled, dropout 0), with and
without activation recompute, in one process: for each shape the kernels are
calibrated once (`gpt3d.plan.calibrate`: one layer's forward/backward, the loss
chunk, the optimizer step), then gpt3d's real training step runs and is compared
with `gpt3d.plan`'s prediction for that layout:
  * saved activations: memory held after one forward minus before (vs the activation terms);
  * peak: torch.cuda.max_memory_allocated over training steps (vs the predicted peak);
  * tokens/s over timed steps (vs the predicted step time).

    python benchmarks/plan_check.py --budget 330 --out results/     # on the GPU machine
    python benchmarks/plan_check.py --device cpu --tiny              # smoke run of the code paths
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpt3d.config import Config
from gpt3d.model.attention import sdpa_backend_context
from gpt3d.plan.layout import layout_of
from gpt3d.plan.presets import GIB, calibration_to_json, resolve_gpu
from gpt3d.plan.search import predict_layout

LLAMA = dict(use_rotary_position_embeddings=True, normalization="rmsnorm", swiglu=True,
             disable_bias_linear=True, untie_embeddings_and_output_weights=True)
SHAPES = {
    "125M": dict(num_layers=12, hidden_size=768, num_attention_heads=12, vocab_size=50257, micro_batch_size=16),
    "1.3B": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, vocab_size=50257, micro_batch_size=8),
    "llama-1.5B": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                       ffn_hidden_size=8192, vocab_size=128256, micro_batch_size=4, **LLAMA),
}
TINY = {
    "125M": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=500, micro_batch_size=2),
    "1.3B": dict(num_layers=2, hidden_size=64, num_attention_heads=2, vocab_size=500, micro_batch_size=2),
    "llama-1.5B": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       ffn_hidden_size=256, vocab_size=1000, micro_batch_size=2, **LLAMA),
}
# most informative first: the run stops starting new cases when --budget seconds have passed. A case is
# "shape:recompute" or "shape:recompute:MBSxSEQxMICRO" (micro-batch, sequence, micro-batches per step).
CASES = ["1.3B:none", "llama-1.5B:none", "1.3B:full", "llama-1.5B:full", "125M:none", "125M:full",
         "1.3B:selective", "llama-1.5B:selective", "125M:selective", "125M:none:8x1024x1", "125M:none:8x1024x4"]


def parse_case(case: str, tiny: bool) -> tuple:
    """(shape, recompute or None, mbs or None, seq or None, micro-batches)."""
    parts = case.split(":")
    name, recompute = parts[0], (None if len(parts) < 2 or parts[1] == "none" else parts[1])
    if len(parts) < 3:
        return name, recompute, None, None, 1
    mbs, seq, micro = (int(x) for x in parts[2].split("x"))
    return name, recompute, (2 if tiny else mbs), (64 if tiny else seq), micro


def make_config(shape: dict, recompute, seq: int, device: str, mbs=None, micro: int = 1) -> Config:
    s = dict(shape)
    mbs = mbs or s.pop("micro_batch_size")
    s.pop("micro_batch_size", None)
    return Config.from_dict({**s, "seq_length": seq, "max_position_embeddings": seq, "hidden_dropout": 0.0,
                             "attention_dropout": 0.0, "micro_batch_size": mbs, "global_batch_size": mbs * micro,
                             "train_iters": 1000, "mock_data": True, "bf16": True, "lr": 1e-4, "weight_decay": 0.1,
                             "clip_grad": 1.0, "device": device, "compile": True, "log_interval": 1000,
                             "recompute_granularity": recompute})


def _mem() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def run_training(cfg: Config, device: torch.device, warmup: int, iters: int) -> dict:
    """gpt3d's real step on synthetic tokens: seconds per step, peak memory, and what one forward keeps."""
    from gpt3d.parallel.state import ParallelState
    from gpt3d.train import Trainer
    cuda = device.type == "cuda"
    trainer = Trainer(cfg, ParallelState.single(device))
    m, mbs = cfg.model, cfg.training.micro_batch_size
    micro = cfg.training.global_batch_size // mbs
    text = torch.randint(0, m.vocab_size, (micro, mbs, m.seq_length + 1), device=device)
    batch = [{"tokens": text[i, :, :-1], "labels": text[i, :, 1:]} for i in range(micro)]
    try:
        for _ in range(warmup):
            trainer.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(iters):
            trainer.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / iters
        out = {"seconds_per_step": sec, "tokens_per_s": micro * mbs * m.seq_length / sec}
        host = 0.0   # the CPU's time to launch a step from an idle GPU (the launch-bound floor)
        for _ in range(3):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.train_step(batch)
            host += time.perf_counter() - t0
        out["host_seconds_per_step"] = host / 3
        if cuda:
            out["peak_bytes"] = torch.cuda.max_memory_allocated()
            out["resting_bytes"] = _mem()         # parameters, gradients, optimizer state, tokens
            torch.cuda.reset_peak_memory_stats()
            base = _mem()
            chunk = trainer.model[0]
            with sdpa_backend_context(m.attention_backend, device):
                loss = chunk(batch[0]["tokens"], batch[0]["labels"]).float().mean()
            out["kept_by_forward_bytes"] = _mem() - base
            loss.backward()
            torch.cuda.synchronize()
            out["forward_backward_peak_over_rest"] = torch.cuda.max_memory_allocated() - base
            trainer.grads.zero_grad()
            del chunk, loss
        return out
    finally:
        del trainer, batch, text
        free_memory(cuda)


def free_memory(cuda: bool) -> None:
    """Drop compiled graphs and collect reference cycles (the gradient buffer's hooks hold the model), so
    the next case starts from an empty GPU: the first run of this script leaked a whole model into the next."""
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run on CPU)")
    p.add_argument("--cases", nargs="+", help="shape:recompute, e.g. 1.3B:none 125M:full (default: all)")
    p.add_argument("--budget", type=float, default=330.0, help="start no new case after this many seconds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--out", help="directory for plan_check.jsonl")
    p.add_argument("--gpu", default="h100-80gb", help="the preset the uncalibrated prediction uses")
    p.add_argument("--no-calibrate", action="store_true", help="predict with the preset only")
    p.add_argument("--case-timeout", type=float, default=240.0, help="seconds a case may run past the budget")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        row = run_case(a, parse_case(a.one, a.tiny))
        if row:
            print("ROW " + json.dumps(row), flush=True)
        return
    start, rows = time.time(), []
    out = open(os.path.join(a.out, "plan_check.jsonl"), "a") if a.out else None
    for case in a.cases or CASES:
        left = a.budget - (time.time() - start)
        if left <= 0:
            print(f"skipped {case}: budget of {a.budget:.0f} s spent", flush=True)
            continue
        # one process per case: nothing a case allocates (compiled graphs, allocator caches) reaches the next
        args = [sys.executable, os.path.abspath(__file__), "--one", case, "--device", a.device, "--gpu", a.gpu,
                "--warmup", str(a.warmup), "--iters", str(a.iters)] + (["--tiny"] if a.tiny else []) + \
            (["--no-calibrate"] if a.no_calibrate else [])
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=left + a.case_timeout)
        except subprocess.TimeoutExpired:
            print(f"{case}: no result within {left + a.case_timeout:.0f} s", flush=True)
            continue
        found = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        for line in proc.stdout.splitlines():
            if not line.startswith("ROW "):
                print(line, flush=True)
        if not found:
            print(f"{case}: failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}", flush=True)
            continue
        rows.append(found[0])
        if out:
            out.write(json.dumps(found[0]) + "\n")
            out.flush()
        print(table(found).splitlines()[-1], f"({time.time() - start:.0f} s)", flush=True)
    print(table(rows))


def run_case(a, case) -> dict:
    """One case in this process: the training step is measured first, on an empty GPU, then the kernels are
    calibrated at the same shape and the planner predicts the layout."""
    name, recompute, mbs, case_seq, micro = case
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    shapes, seq = (TINY, 64) if a.tiny else (SHAPES, 2048)
    cfg = make_config(shapes[name], recompute, case_seq or seq, a.device, mbs, micro)
    t_case = time.time()
    try:
        meas = run_training(cfg, device, a.warmup, a.iters)
    except Exception as e:   # noqa: BLE001 - e.g. out of memory: report it, go on with the next case
        print(f"{name} {recompute}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return {}
    calibration = None
    if (cuda or a.tiny) and not a.no_calibrate:
        from gpt3d.plan.calibrate import calibrate
        t_cal = time.time()
        calibration = calibrate(cfg, verbose=True, device=a.device,
                                **({} if cuda else dict(warmup=1, iters=1, optimizer_params=100_000)))
        print(f"<!-- plan-calibration {calibration_to_json(calibration)} --> ({time.time() - t_cal:.0f} s)",
              flush=True)
    gpu = resolve_gpu(a.gpu, calibration=calibration)
    lay = layout_of(cfg, 1)
    pred = predict_layout(cfg, lay, gpu, 8, device=a.device)
    preset = predict_layout(cfg, lay, resolve_gpu(a.gpu), 8, device=a.device)
    stage = pred.stages[0]
    return {"shape": name, "recompute": recompute or "none", "mbs": lay.mbs, "seq": cfg.model.seq_length,
            "micro": lay.num_micro,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "pred_peak_gib": pred.peak_bytes / GIB, "pred_persistent_gib": stage.persistent.total / GIB,
            "pred_peak_over_rest_gib": (pred.peak_bytes - stage.persistent.total
                                        - stage.other.items.get("token batches (this step and the next)", 0)) / GIB,
            "pred_kept_by_forward_gib": stage.per_microbatch.total / GIB,
            "pred_tokens_per_s": pred.tokens_per_s, "preset_tokens_per_s": preset.tokens_per_s,
            "pred_memory_gib": {k: v / GIB for k, v in pred.memory.items()},
            "pred_time_ms": {k: v * 1e3 for k, v in pred.time.parts.items()},
            "preset_time_ms": {k: v * 1e3 for k, v in preset.time.parts.items()},
            "pred_activation_terms_gib": {k: v / GIB for k, v in stage.per_microbatch.items.items()},
            **{k: (v / GIB if k.endswith("bytes") or k.endswith("rest") else v) for k, v in meas.items()},
            "calibration": json.loads(calibration_to_json(gpu.calibration)), "case_seconds": time.time() - t_case}


def _err(pred, meas) -> str:
    return f"{(pred - meas) / meas:+.1%}" if meas else "n/a"


def table(rows: list) -> str:
    """Peak over rest (training peak minus memory between steps) is what activations and backward add; the
    resting memory is the persistent states (+ the token batch)."""
    lines = ["| shape | recompute | mbs x seq x micro | kept by forward GiB pred / meas | "
             "peak over rest GiB pred / meas | "
             "resting GiB pred / meas | peak GiB pred / meas | tokens/s pred / meas | preset tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def pair(p, m, fmt=".2f"):
            return f"{p:{fmt}} / {m:{fmt}} ({_err(p, m)})" if m is not None else f"{p:{fmt}} / n/a"
        lines.append(
            f"| {r['shape']} | {r['recompute']} | {r['mbs']}x{r['seq']}x{r.get('micro', 1)} | "
            f"{pair(r['pred_kept_by_forward_gib'], r.get('kept_by_forward_bytes'))} | "
            f"{pair(r['pred_peak_over_rest_gib'], _sub(r.get('peak_bytes'), r.get('resting_bytes')))} | "
            f"{pair(r['pred_persistent_gib'], r.get('resting_bytes'))} | "
            f"{pair(r['pred_peak_gib'], r.get('peak_bytes'))} | "
            f"{pair(r['pred_tokens_per_s'], r['tokens_per_s'], ',.0f')} | "
            f"{r['preset_tokens_per_s']:,.0f} ({_err(r['preset_tokens_per_s'], r['tokens_per_s'])}) |")
    return "\n".join(lines)


def _sub(a, b):
    return a - b if a is not None and b is not None else None


if __name__ == "__main__":
    main()
