"""Is compiling never slower than eager, and dropout nearly free, on the runs users launch? One GPU call.

Issue 29's checks, on one GPU, at the bench shapes (125M, 1.3B, the Llama-1.5B shape; seq 2048): `gpt3d train`
tokens/s with dropout 0/0 against hidden 0.1 + attention 0.1, compiled against eager, bf16 and fp16, no /
selective / full recompute for examples/train_1gpu.sh, with the graph breaks and graphs Dynamo compiled, the
first step's seconds (compilation) and peak memory; `gpt3d bench`'s 125M row as the reference; the planner's
prediction beside every row (its dropout term is checked here). Prints one compact table.

    python benchmarks/compile_check.py --out $OUT --deadline 470
    python benchmarks/compile_check.py --only "125M" --deadline 300           # a subset (substrings of names)
    python benchmarks/compile_check.py --baseline d1730e2 --only "1gpu" "1.3B"   # also the old code, same call

Each run is the real training loop (`Trainer.run`, what `gpt3d train` runs) in a worker process per group of
runs of one shape (one torch import, Inductor's caches shared by the group), on mock data (the mock sampler
costs ~0.15 ms a sample on the host, hidden behind the step), no checkpoint saved. Settings are applied to the
parsed config in Python, so `--baseline` runs the same runs with an older gpt3d (a directory holding its
`gpt3d/` package, or a git commit exported with `git archive` when a .git is at hand). Runs are done in
priority order under one deadline; what does not fit is reported as skipped, never silently dropped. Rows go to
OUT/compile_check.jsonl as they finish; worker logs to OUT/compile_check_log.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ["--use-rotary-position-embeddings", "--normalization", "rmsnorm", "--swiglu", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights", "--num-key-value-heads", "8", "--ffn-hidden-size", "8192",
         "--vocab-size", "128256"]
SHAPE = {   # gpt3d/perf/bench.py's SHAPES as train flags, at the bench's micro-batch, one micro-batch per step
    "1.3B": ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--micro-batch-size",
             "8", "--global-batch-size", "8"],
    "llama": ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "32", *LLAMA,
              "--micro-batch-size", "4", "--global-batch-size", "4"],
}
# examples/train_1gpu.sh's settings, as it ships (recompute and dropout are set per run below)
ONE_GPU = ["--config", str(ROOT / "configs" / "gpt-125M.yaml"), "--tensor-model-parallel-size", "1",
           "--pipeline-model-parallel-size", "1", "--micro-batch-size", "16"]
SEQ = 2048
SMOKE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "256",
         "--num-key-value-heads", "4", "--ffn-hidden-size", "128", "--global-batch-size", "4", "--micro-batch-size",
         "2", "--device", "cpu"]   # --smoke: the plumbing on a CPU, tiny shapes (no timing meaning)
DROP = {"hidden_dropout": 0.1, "attention_dropout": 0.1}
NO_DROP = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
FP16 = {"bf16": False, "fp16": True}


@dataclass
class Run:
    name: str
    group: str                      # runs of one group share a worker process
    flags: list                     # train flags every gpt3d version parses
    set: dict = field(default_factory=dict)   # config fields set after parsing (None = unset)
    iters: int = 8
    log: int = 2
    est_s: float = 60.0             # expected seconds (skip when less is left)
    bench: bool = False             # time `gpt3d bench`'s step (gpt3d/perf/bench.py) instead of the loop
    hash_bits: bool = False         # check the dropout hash's bits on the GPU against the CPU's instead


def runs() -> list:
    c, n = dict(compile=True), dict(compile=False)
    ship = dict(recompute_granularity=None, **c)

    def one(name: str, group: str, settings: dict, **kw) -> Run:   # examples/train_1gpu.sh: 16 micro-batches
        return Run(name, group, ONE_GPU, settings, **{"iters": 6, "log": 2, **kw})

    def big(name: str, shape: str, settings: dict, group: str = "", **kw) -> Run:
        return Run(name, group or shape, SHAPE[shape], settings, **kw)

    return [   # priority order: what a deadline cuts is at the end
        Run("dropout hash: GPU bits == CPU bits (eager kernel and inside a compiled graph)", "125M", [],
            hash_bits=True, est_s=20),
        one("125M 1gpu.sh as shipped (16x16, no recompute, drop .1, compiled)", "125M", {**ship, **DROP}, est_s=70),
        Run("125M gpt3d bench 16x1, drop 0 (reference)", "125M", ["--model", "125M"], bench=True, est_s=40),
        one("125M 1gpu.sh, drop 0", "125M", {**ship, **NO_DROP}, est_s=50),
        one("125M 1gpu.sh, eager", "125M", {**ship, **DROP, **n}, est_s=30),
        big("1.3B 8x1 drop 0", "1.3B", {**NO_DROP, **c}, est_s=110),
        big("1.3B 8x1 drop .1", "1.3B", {**DROP, **c}, est_s=90),
        big("1.3B 8x1 drop .1 eager", "1.3B", {**DROP, **n}, iters=4, log=1, est_s=30),
        big("llama 4x1 drop 0", "llama", {**NO_DROP, **c}, est_s=90),
        big("llama 4x1 drop .1", "llama", {**DROP, **c}, est_s=80),
        big("llama 4x1 drop .1 eager", "llama", {**DROP, **n}, iters=4, log=1, est_s=30),
        one("125M 1gpu.sh fp16, drop .1", "125M extra", {**ship, **DROP, **FP16}, est_s=60),
        one("125M 1gpu.sh fp16, drop 0", "125M extra", {**ship, **NO_DROP, **FP16}, est_s=50),
        one("125M 1gpu.sh selective recompute", "125M extra", {**ship, **DROP, "recompute_granularity": "selective"},
            est_s=60),
        one("125M 1gpu.sh full recompute", "125M extra", {**ship, **DROP, "recompute_granularity": "full"}, est_s=60),
        Run("125M 1gpu.sh as shipped before (8x32, full recompute, eager)", "125M extra",
            [*ONE_GPU[:-1], "8"], {**DROP, **n}, iters=3, log=1, est_s=40),
        one("125M 1gpu.sh, regional compile (layer)", "125M extra", {**ship, **DROP, "compile_granularity": "layer"},
            est_s=40),
        big("1.3B 8x1 drop .1, regional compile (layer)", "1.3B", {**DROP, **c, "compile_granularity": "layer"},
            "1.3B extra", est_s=60),
        big("1.3B 8x1 fp16 drop .1", "1.3B", {**DROP, **c, **FP16}, "1.3B extra", est_s=90),
        big("1.3B 8x1 fp16 drop 0", "1.3B", {**NO_DROP, **c, **FP16}, "1.3B extra", est_s=90),
    ]


# ----- worker: one process per group -------------------------------------------------------------------------
def _config(run: Run, run_dir: Path, smoke: bool = False):
    from gpt3d.cli import build_parser
    from gpt3d.config.load import load_config
    seq = "64" if smoke else str(SEQ)
    flags = [*run.flags, *(SMOKE if smoke else []), "--seq-length", seq, "--max-position-embeddings", seq,
             "--mock-data",
             "--train-iters", str(run.iters), "--log-interval", str(run.log), "--eval-interval", "100000",
             "--eval-iters", "0", "--lr", "1e-4", "--log-file", str(run_dir / "metrics.jsonl")]
    if "--config" not in run.flags and not smoke:
        flags.append("--bf16")
    cfg = load_config(build_parser("train").parse_args(["train", *flags]))
    cfg.checkpoint.save = None
    cfg.training.exit_signal_handler = False
    for k, v in run.set.items():
        section = next((s for s in vars(cfg).values() if hasattr(s, k)), None)
        if section is None:
            if k == "compile_granularity" and v != "layer":
                continue
            raise RuntimeError(f"this gpt3d has no setting {k}")
        setattr(section, k, v)
    return cfg


def _bench(run: Run) -> dict:
    import gpt3d.perf.bench as b
    from gpt3d.commands.bench import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = b._config("125M", p.parse_args(run.flags + ["--peer", "none"]))
    r = b.bench_gpt3d(cfg, 3, 10)
    tokens = cfg.training.global_batch_size * cfg.model.seq_length
    return {"tokens_per_s": tokens / r["seconds_per_iter"], "peak_gib": r["peak_mem_gib"]}


def _hash_bits() -> dict:
    """The replicated-dropout mask of one site on the GPU (the eager path's compiled kernel, and traced into a
    compiled function) must be the CPU's bit for bit: Triton's int32 arithmetic has to wrap as the CPU's does."""
    import torch

    from gpt3d.parallel import random as R
    from gpt3d.parallel.state import ParallelState
    shape, out = torch.Size([8, 2048, 768]), {}
    for dev in ("cpu", "cuda"):
        rng = R.TPRNG(1234, ParallelState(device=torch.device(dev)))
        draw, site = rng.next_draw() + 7, torch.tensor(4 * 11 + 1, device=dev)
        out[dev] = R.keep_mask(shape, torch.device(dev), 0.1, rng.seed, draw, site).cpu()
        if dev == "cuda":
            # the lambda is compiled and called in this iteration, so it sees this iteration's dev and rng
            traced = torch.compile(lambda d, s: R.keep_mask(shape, torch.device(dev), 0.1, rng.seed, d, s))  # noqa: B023
            out["compiled"] = traced(draw, site).cpu()
    same = torch.equal(out["cpu"], out["cuda"]) and torch.equal(out["cpu"], out["compiled"])
    return {"ok": same, "dropped": round(1 - float(out["cuda"].float().mean()), 5),
            **({} if same else {"error": "GPU dropout masks differ from the CPU's"})}


def _train(run: Run, run_dir: Path, smoke: bool = False) -> dict:
    import statistics

    import torch
    from torch._dynamo.utils import counters

    from gpt3d.train import Trainer
    cfg = _config(run, run_dir, smoke)
    if smoke:
        cfg.precision.bf16 = cfg.precision.fp16 = False
    cuda = torch.cuda.is_available() and not smoke
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch._dynamo.reset()
    counters.clear()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first: dict = {}

    class Timed(Trainer):
        def train_step(self, microbatches):   # the first step, synchronised: compilation is in it
            if first:
                return super().train_step(microbatches)
            sync()
            t = time.perf_counter()
            out = super().train_step(microbatches)
            sync()
            first["s"] = time.perf_counter() - t
            return out

    t = Timed(cfg)
    plan = getattr(t, "plan", None)
    advice = getattr(t, "advice", None)
    t.run()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "tokens_per_s" in x]
    steady = [x["tokens_per_s"] for x in rows][1:]
    step_s = cfg.training.global_batch_size * cfg.model.seq_length / statistics.median(steady) if steady else 0.0
    out = {"tokens_per_s": statistics.median(steady) if steady else None,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
           "first_step_s": first.get("s"), "compile_s": max(0.0, first.get("s", 0.0) - step_s),
           "graph_breaks": sum(counters["graph_break"].values()),
           "graphs": counters["stats"].get("unique_graphs", 0),
           "break_reasons": sorted({k.splitlines()[0][:120] for k in counters["graph_break"]})[:3],
           "predicted_tokens_per_s": plan.tokens_per_s if plan is not None else None,
           "advice": advice.line() if advice is not None else None}
    del t
    return out


def worker(args) -> int:
    import gc

    import torch
    sys.path.insert(0, str(Path(args.pkg).resolve()))
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    todo = [r for r in runs() if r.group == args.worker and _wanted(r, args.only) and not (args.tag and r.hash_bits)]
    with open(out / "compile_check.jsonl", "a") as results:
        for run in todo:
            row = {"run": args.tag + run.name, **{k: v for k, v in asdict(run).items() if k in ("group", "set")}}
            left = args.end - time.time()
            if left < run.est_s:
                row["error"] = f"skipped: {left:.0f} s left, needs ~{run.est_s:.0f}"
            else:
                run_dir = out / "runs" / "".join(ch if ch.isalnum() else "_" for ch in args.tag + run.name)
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
                t0 = time.time()
                try:
                    row.update(_hash_bits() if run.hash_bits else _bench(run) if run.bench else
                               _train(run, run_dir, args.smoke))
                except Exception as e:  # noqa: BLE001 - one run's failure is its row, not the check's
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                row["wall_s"] = round(time.time() - t0, 1)
                gc.collect()
                torch._dynamo.reset()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            results.write(json.dumps(row) + "\n")
            results.flush()
            print(json.dumps(row), flush=True)
    return 0


def _wanted(run: Run, only) -> bool:
    return not only or any(s in run.name for s in only)


# ----- driver ----------------------------------------------------------------------------------------------
def baseline_package(ref: str, out: Path) -> Path:
    """A directory holding the gpt3d package to compare with: `ref` itself, or commit `ref` exported."""
    if Path(ref, "gpt3d").is_dir():
        return Path(ref).resolve()
    dest = out / f"baseline_{ref}"
    if not (dest / "gpt3d").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "gpt3d"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def table(rows: list) -> str:
    ref = {}
    for r in rows:   # dropout 0 and compiled twins: the ratios issue 29 asks for
        if r.get("tokens_per_s"):
            ref[r["run"]] = r["tokens_per_s"]
    bench = next((v for k, v in ref.items() if "bench" in k), None)
    lines = ["| run | tokens/s | vs bench 125M | predicted | peak GiB | first step s | graph breaks / graphs | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tok = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else ""
        vs = f"{r['tokens_per_s'] / bench:.2f}x" if bench and r.get("tokens_per_s") and r["run"].startswith(
            ("125M", "base:125M")) else ""
        pred = f"{r['predicted_tokens_per_s']:,.0f}" if r.get("predicted_tokens_per_s") else ""
        mem = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else ""
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") else ""
        gb = f"{r['graph_breaks']} / {r['graphs']}" if "graph_breaks" in r else ""
        note = r.get("error") or "; ".join(r.get("break_reasons") or []) or (
            f"bits equal, dropped {r['dropped']}" if r.get("ok") else "")
        lines.append(f"| {r['run']} | {tok} | {vs} | {pred} | {mem} | {first} | {gb} | {note} |")
    return "\n".join(lines)


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--out", default=os.environ.get("OUT", "/tmp/compile_check"))
    a.add_argument("--deadline", type=float, default=470.0, help="seconds for everything")
    a.add_argument("--only", nargs="*", help="run names (substrings) to run")
    a.add_argument("--baseline", help="a gpt3d commit (exported with git archive) or a directory holding gpt3d/")
    a.add_argument("--dry", action="store_true", help="list the runs and stop")
    a.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    a.add_argument("--worker", help=argparse.SUPPRESS)
    a.add_argument("--pkg", default=str(ROOT), help=argparse.SUPPRESS)
    a.add_argument("--tag", default="", help=argparse.SUPPRESS)
    a.add_argument("--end", type=float, help=argparse.SUPPRESS)
    args = a.parse_args()
    if args.worker:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [r for r in runs() if _wanted(r, args.only)]
    if args.dry:
        for r in chosen:
            print(f"{r.group:>12} | {r.name} | {' '.join(r.flags)} | {r.set}")
        return 0
    t0 = time.time()
    end = t0 + args.deadline
    packages = [("", ROOT)]
    if args.baseline:
        packages.append((f"base:{args.baseline}:", baseline_package(args.baseline, out)))
    groups = list(dict.fromkeys(r.group for r in chosen))
    start = (out / "compile_check.jsonl").stat().st_size if (out / "compile_check.jsonl").exists() else 0
    with open(out / "compile_check_log.txt", "a") as log:
        for group in groups:   # interleaved: each group with the current code, then with the baseline's
            for tag, pkg in packages:
                if time.time() > end - 20:
                    break
                env = {**os.environ, "PYTHONPATH": str(pkg), "PYTHONUNBUFFERED": "1"}
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", group, "--pkg", str(pkg), "--tag",
                       tag, "--out", str(out), "--end", str(end), *(["--only", *args.only] if args.only else [])]
                cmd += ["--smoke"] if args.smoke else []
                try:
                    p = subprocess.run(cmd, cwd=pkg, env=env, stdout=log, stderr=log,
                                       timeout=max(30, end - time.time()))
                    if p.returncode:
                        log.write(f"== worker {tag}{group}: exit {p.returncode}\n")
                except subprocess.TimeoutExpired:
                    log.write(f"== worker {tag}{group}: deadline\n")
    with open(out / "compile_check.jsonl") as fh:
        fh.seek(start)
        rows = [json.loads(x) for x in fh if x.strip()]
    done = {r["run"] for r in rows}
    for tag, _ in packages:
        rows += [{"run": tag + r.name, "error": "skipped: deadline"} for r in chosen
                 if tag + r.name not in done and not (tag and r.hash_bits)]
    print(f"compile_check: {len(rows)} runs in {time.time() - t0:.0f} s (device: see nvidia-smi)\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
