"""Does --deterministic-mode make two runs of one command give the same losses, and what does it cost?

Runs one short `gpt3d train` command four times on this machine's GPU(s): twice with --deterministic-mode,
twice without, each writing every iteration's loss and gradient norm (--log-interval 1). Each pair is
compared bit for bit (the JSON floats round-trip exactly); timings are the median seconds per iteration
after the warm-up iterations, and the wall time of each run.

    python benchmarks/deterministic_check.py                      # 125M shape, bf16, mock data, 1 GPU
    python benchmarks/deterministic_check.py --compile            # the same with torch.compile
    python benchmarks/deterministic_check.py --nproc 8 -- --tensor-model-parallel-size 2   # via torchrun

Exit status 0 when the deterministic pair is identical, 1 otherwise. The default pair without the flag may
or may not differ on a given run (it shows whether the flag was needed there).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12", "--seq-length", "2048",
         "--micro-batch-size", "8", "--global-batch-size", "32", "--bf16", "--mock-data", "--lr", "6e-4",
         "--lr-warmup-iters", "5", "--min-lr", "6e-5", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
         "--eval-interval", "100000", "--eval-iters", "0", "--log-interval", "1", "--no-exit-signal-handler"]


def run(args, extra: list, deterministic: bool, log: Path) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)] \
        if args.nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "gpt3d", "train", *SHAPE, "--train-iters", str(args.iters), "--log-file", str(log),
           *(["--compile"] if args.compile else []), *(["--deterministic-mode"] if deterministic else []), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "NCCL_ALGO")}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"run failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-4000:]}")
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    rows = [x for x in rows if "loss" in x]
    steady = [x["seconds_per_iter"] for x in rows if x["iteration"] > args.warmup]
    return {"losses": [x["loss"] for x in rows], "grad_norms": [x["grad_norm"] for x in rows], "wall_s": wall,
            "s_per_iter": statistics.median(steady), "tokens_per_s": statistics.median(
                x["tokens_per_s"] for x in rows if x["iteration"] > args.warmup)}


def compare(a: dict, b: dict) -> dict:
    first = next((i + 1 for i, (x, y) in enumerate(zip(a["losses"], b["losses"])) if x != y), None)
    first_norm = next((i + 1 for i, (x, y) in enumerate(zip(a["grad_norms"], b["grad_norms"])) if x != y), None)
    return {"identical": first is None and first_norm is None and len(a["losses"]) == len(b["losses"]),
            "first_loss_difference_at": first, "first_grad_norm_difference_at": first_norm,
            "max_abs_loss_difference": max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="iterations left out of the timing")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (torchrun) ")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("extra", nargs="*", help="more gpt3d train flags (after --)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for name, det in (("deterministic_1", True), ("deterministic_2", True), ("default_1", False),
                          ("default_2", False)):
            res[name] = run(args, args.extra, det, Path(tmp) / f"{name}.jsonl")
            print(f"{name}: wall {res[name]['wall_s']:.1f} s, {res[name]['s_per_iter'] * 1000:.1f} ms/iter, "
                  f"{res[name]['tokens_per_s']:,.0f} tokens/s, final loss {res[name]['losses'][-1]!r}", flush=True)
    det, default = compare(res["deterministic_1"], res["deterministic_2"]), compare(res["default_1"], res["default_2"])
    cost = statistics.mean([res["deterministic_1"]["s_per_iter"], res["deterministic_2"]["s_per_iter"]]) / \
        statistics.mean([res["default_1"]["s_per_iter"], res["default_2"]["s_per_iter"]])
    print(f"--deterministic-mode pair: {'IDENTICAL' if det['identical'] else 'DIFFERENT'} {det}")
    print(f"default pair:              {'identical' if default['identical'] else 'different'} {default}")
    print(f"deterministic / default time per iteration: {cost:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": res, "deterministic": det, "default": default,
                                              "time_ratio": cost, "command_flags": SHAPE + args.extra,
                                              "compile": args.compile, "iters": args.iters}, indent=1))
    return 0 if det["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
