"""One device call's worth of speed measurements: `gpt3d bench` and `gpt3d train` on real .bin/.idx data at the
bench shapes, in bf16 / fp16 / FP8 and with gradient accumulation, plus loss curves (FP8 vs bf16 on real text).

Why one script: the device is lent in short calls and compilation dominates them. So the suite first runs the
distinct compiled graphs side by side in "warm" waves (one step each, packed by their memory), which fills
Inductor's on-disk caches, then runs the timed jobs one at a time; a timed job finds its graph in the cache and
spends its seconds on steps. Loss-curve jobs need no quiet GPU and run inside the warm waves. Every job has a
time limit and the whole suite a deadline: what does not fit is reported as skipped, never silently dropped.

    python benchmarks/speed_suite.py --plan bf16 --data-dir .bench_data --out $OUT --deadline 560

`--baseline DIR` runs the jobs marked `base` a second time with the gpt3d package in DIR (e.g. the previous
commit's, `git archive HEAD gpt3d | tar -x -C DIR`), in the same call, for a before/after comparison. The fp8
plan marks its bf16 benches `base`, and the suite ends with each FP8 row's ratio to the bf16 bench of its shape,
this tree's and the baseline's: with DIR holding commit d1730e2, issue 25's FP8 ratios from one call. The
`peers` plan does the same for bf16 at the other GPT shapes (each job over its baseline run), and the `dropout`
plan runs `gpt3d train` with hidden and attention dropout 0.1 beside 0 (each dropout row over its twin).
Rows go to OUT/suite.jsonl as they finish; a markdown table is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LLAMA = ["--use-rotary-position-embeddings", "--normalization", "rmsnorm", "--swiglu", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights", "--num-key-value-heads", "8", "--ffn-hidden-size", "8192",
         "--vocab-size", "128256"]
MODEL_FLAGS = {   # gpt3d/perf/bench.py's SHAPES as train flags
    "125M": ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12"],
    "1.3B": ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16"],
    "llama-1.5B": ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "32", *LLAMA],
}

GPT_2_7B = ["--num-layers", "32", "--hidden-size", "2560", "--num-attention-heads", "32"]   # issue 25's 2.7B shape


START_MARGIN_S = 75   # start no timed job with less than this left before the deadline


@dataclass
class Job:
    name: str
    kind: str                  # bench | train | curve
    shape: str
    mbs: int
    micro: int = 1
    seq: int = 2048
    prec: str = "bf16"         # bf16 | fp16 | fp8
    iters: int = 30
    log: int = 5               # train: log interval (tokens/s = median of the lines after the first two)
    peer: str = "none"
    mem: float = 20.0          # GiB, for packing warm waves
    warm: bool = True          # compile in a warm wave first
    base: bool = False         # also run with --baseline's package
    drop: float = 0.0          # train: hidden and attention dropout
    extra: list = field(default_factory=list)


def plans() -> dict:
    b, t = "bench", "train"
    return {
        "bf16": [   # GPT shapes: bench vs train on real data, accumulation, fp16, small micro-batches
            Job("125M bench 16x1 (+HF)", b, "125M", 16, peer="hf", mem=40),
            Job("125M train 16x1", t, "125M", 16, iters=40, log=5, warm=False),
            Job("125M bench 16x16", b, "125M", 16, 16, iters=4, warm=False, base=True),
            Job("125M train 16x16", t, "125M", 16, 16, iters=12, log=2, warm=False),
            Job("125M bench fp16 16x1", b, "125M", 16, prec="fp16", mem=16),
            Job("125M train fp16 16x1", t, "125M", 16, prec="fp16", iters=40, log=5, warm=False),
            Job("125M bench 8x1024 x1", b, "125M", 8, seq=1024, mem=6),
            Job("125M bench 8x1024 x32", b, "125M", 8, 32, seq=1024, iters=4, warm=False),
            Job("1.3B bench 8x1", b, "1.3B", 8, mem=52, base=True),
            Job("1.3B train 8x1", t, "1.3B", 8, iters=25, log=5, warm=False),
            Job("1.3B bench 8x16", b, "1.3B", 8, 16, iters=3, warm=False, base=True),
        ],
        "llama": [   # the Llama shape with its HF peer, bench vs train; FP8-vs-bf16 loss curves alongside
            Job("125M curve bf16", "curve", "125M", 8, seq=1024, iters=320, log=10, mem=6),
            Job("125M curve fp8", "curve", "125M", 8, seq=1024, prec="fp8", iters=320, log=10, mem=6),
            Job("llama bench 4x1 (+HF)", b, "llama-1.5B", 4, peer="hf", mem=60),
            Job("llama train 4x1", t, "llama-1.5B", 4, iters=25, log=5, warm=False),
            Job("llama bench 8x4", b, "llama-1.5B", 8, 4, iters=5, mem=52),
            Job("llama train 8x4", t, "llama-1.5B", 8, 4, iters=15, log=3, warm=False),
        ],
        "fp8": [   # FP8 vs bf16 at the 1.3B and Llama shapes, same call; FP8 in train
            Job("1.3B bench fp8 8x1", b, "1.3B", 8, prec="fp8", mem=42),
            Job("1.3B train fp8 8x1", t, "1.3B", 8, prec="fp8", iters=25, log=5, warm=False),
            Job("1.3B bench 8x1", b, "1.3B", 8, mem=50, base=True),
            Job("llama bench fp8 4x1", b, "llama-1.5B", 4, prec="fp8", mem=36),
            Job("llama bench 4x1", b, "llama-1.5B", 4, mem=38, base=True),
        ],
        "peers": [   # bf16 benches at issue 25's other GPT shapes, this tree against --baseline's, same call
            Job("125M bench 16x1", b, "125M", 16, mem=16, base=True),
            Job("350M bench 16x1", b, "350M", 16, mem=26, base=True),
            Job("2.7B bench 4x1", b, "custom", 4, mem=50, base=True, extra=GPT_2_7B),
        ],
        "dropout": [   # gpt3d train with hidden and attention dropout 0.1 against 0, bf16 and fp16, same call
            Job(f"{shape} train {prec} {mbs}x1 drop {d}", t, shape, mbs, prec=prec, drop=d, mem=mem,
                iters=40 if shape == "125M" else 20, log=5)
            for shape, mbs, mem in (("125M", 16, 18), ("1.3B", 8, 58), ("llama-1.5B", 4, 42))
            for prec in ("bf16", "fp16") for d in (0.0, 0.1)
        ],
    }


def precision_flags(prec: str, bench: bool) -> list:
    """bench takes bf16 by default and --fp8 on top of it; train names bf16 explicitly."""
    flags = {"bf16": [] if bench else ["--bf16"], "fp16": ["--fp16"],
             "fp8": ["--fp8"] if bench else ["--bf16", "--fp8"]}
    return flags[prec]


def command(job: Job, data: Path, run_dir: Path, warm: bool) -> list:
    py = [sys.executable, "-m", "gpt3d"]
    if job.kind == "bench":
        iters, warmup = (1, 1) if warm else (job.iters, 2)
        return [*py, "bench", "--model", job.shape, "--micro-batch-size", str(job.mbs), "--micro-batches",
                str(job.micro), "--seq-length", str(job.seq), "--peer", job.peer, "--json", "--iters", str(iters),
                "--warmup", str(warmup), *precision_flags(job.prec, True), *job.extra]
    iters = 2 if warm and job.kind == "train" else job.iters
    return [*py, "train", *MODEL_FLAGS[job.shape], "--micro-batch-size", str(job.mbs),
            "--global-batch-size", str(job.mbs * job.micro), "--seq-length", str(job.seq),
            "--max-position-embeddings", str(job.seq), *precision_flags(job.prec, False), "--compile",
            "--no-mock-data", "--data-path", str(data / "corpus_text_document"),
            "--vocab-file", str(data / "gpt2-vocab.json"), "--merge-file", str(data / "gpt2-merges.txt"),
            "--split", "98,2,0", "--train-iters", str(iters), "--log-interval", str(job.log),
            "--eval-interval", "100000", "--eval-iters", "0", "--hidden-dropout", str(job.drop),
            "--attention-dropout", str(job.drop),
            "--lr", "6e-4" if job.kind == "curve" else "1e-4", "--min-lr", "6e-5", "--lr-warmup-iters",
            "20" if job.kind == "curve" else "0", "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--log-file", str(run_dir / "metrics.jsonl"), "--no-exit-signal-handler", *job.extra]


def prepare_data(data_dir: Path, out: Path) -> Path:
    """tinyshakespeare + wikitext-2 valid/test, paragraphs as documents, GPT-2 BPE, --append-eod."""
    work = out / "data"
    work.mkdir(parents=True, exist_ok=True)
    docs = []
    for name in ("tinyshakespeare.txt", "wikitext-2-valid.txt", "wikitext-2-test.txt"):
        if (data_dir / name).exists():
            docs += [x for x in (data_dir / name).read_text().split("\n\n") if x.strip()]
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": x + "\n\n"}) + "\n" for x in docs))
    for f in ("gpt2-vocab.json", "gpt2-merges.txt"):
        (work / f).write_bytes((data_dir / f).read_bytes())
    subprocess.run([sys.executable, "-m", "gpt3d", "preprocess", "--input", str(work / "corpus.jsonl"),
                    "--output-prefix", str(work / "corpus"), "--vocab-file", str(work / "gpt2-vocab.json"),
                    "--merge-file", str(work / "gpt2-merges.txt"), "--json-keys", "text", "--append-eod",
                    "--workers", "4"], check=True, capture_output=True)
    return work


def parse(job: Job, stdout: str, run_dir: Path) -> dict:
    if job.kind == "bench":
        rows = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
        me = next(r for r in rows if r["system"] == "gpt3d")
        out = {k: me.get(k) for k in ("tokens_per_s", "mfu", "tflops_per_gpu", "peak_mem_gib", "error",
                                      "gemm_tuning")}
        peer = next((r for r in rows if r["system"] != "gpt3d"), None)
        if peer:
            out.update(peer=peer["system"], peer_tokens_per_s=peer.get("tokens_per_s"),
                       peer_mem=peer.get("peak_mem_gib"), peer_micro=peer.get("micro_batch"), vs_peer=me.get("vs_peer"))
        return out
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in lines if "tokens_per_s" in x]
    steady = [x["tokens_per_s"] for x in rows][2:] or [x["tokens_per_s"] for x in rows][1:]
    out = {"tokens_per_s": statistics.median(steady) if steady else None,
           "mfu": statistics.median([x["mfu"] for x in rows][2:] or [0]),
           "losses": [(x["iteration"], round(x["loss"], 4)) for x in rows]}
    return out


def gpu_gib() -> float:
    """What one warm wave may use: 92% of the first GPU's memory (the rest: each process's CUDA context and
    the allocator's slack). 132 GiB (an H200's share) where no GPU answers."""
    import torch
    if torch.cuda.is_available():
        return 0.92 * torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    return 132.0


def waves(jobs: list, gib: float) -> list:
    """The warm jobs packed first-fit, in order, into waves whose `mem` estimates sum to at most `gib` (a job
    larger than that runs alone). On an H100 no two of the fp8 plan's big shapes fit together: 1.3B FP8 and bf16
    side by side ran out of memory (RESULTS.md, session 32)."""
    todo, out = list(jobs), []
    while todo:
        wave, used = [], 0.0
        for j in list(todo):
            if not wave or used + j.mem <= gib:
                wave.append(j)
                used += j.mem
                todo.remove(j)
        out.append(wave)
    return out


def ratios(rows: list) -> list:
    """Same-call ratios: each FP8 row's tokens/s over the bf16 bench of its shape and batch (this tree's, and
    the baseline's where the suite ran one); each job run with both packages, this tree's over the baseline's;
    each dropout row over the same run without dropout."""
    def key(r, **kw):
        return tuple({**r, **kw}[k] for k in ("kind", "shape", "mbs", "micro", "seq", "prec", "drop"))
    tps = {(r["job"].startswith("base:"), key(r)): r["tokens_per_s"] for r in rows if r.get("tokens_per_s")}
    out = []
    for r in rows:
        if r["job"].startswith("base:") or not r.get("tokens_per_s"):
            continue
        v = r["tokens_per_s"]
        if r["prec"] == "fp8":
            for base, name in ((False, "this tree's"), (True, "the baseline's")):
                ref = tps.get((base, key(r, kind="bench", prec="bf16")))
                if ref:
                    out.append(f"{r['job']}: {v / ref:.3f}x {name} bf16 bench ({ref:,.0f} tok/s)")
        ref = tps.get((True, key(r)))
        if ref:
            out.append(f"{r['job']}: {v / ref:.3f}x the baseline's ({ref:,.0f} tok/s)")
        ref = tps.get((False, key(r, drop=0.0))) if r.get("drop") else None
        if ref:
            out.append(f"{r['job']}: {v / ref:.3f}x the same run without dropout ({ref:,.0f} tok/s)")
    return out


def run_one(job: Job, cwd: Path, data: Path, out: Path, tag: str, warm: bool, timeout: float):
    run_dir = out / "runs" / (tag + job.name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    cmd = command(job, data, run_dir, warm)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), \
        run_dir, time.time() + timeout


def finish(p, job: Job, run_dir: Path, deadline: float, log) -> dict:
    try:
        stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        p.kill()
        stdout, stderr = p.communicate()
        log.write(f"== {job.name}: TIMEOUT\n{stderr[-3000:]}\n")
        return {"error": "timeout"}
    if p.returncode:
        log.write(f"== {job.name}: exit {p.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}\n")
        return {"error": f"exit {p.returncode}: {stderr.strip().splitlines()[-1][:200] if stderr.strip() else ''}"}
    try:
        return parse(job, stdout, run_dir)
    except Exception as e:  # noqa: BLE001 - a parse failure is one row's problem, not the suite's
        log.write(f"== {job.name}: parse {e!r}\n{stdout[-2000:]}\n")
        return {"error": f"parse: {e!r}"}


def main() -> int:
    a = argparse.ArgumentParser()
    a.add_argument("--plan", choices=sorted(plans()), required=True)
    a.add_argument("--data-dir", default=".bench_data")
    a.add_argument("--out", default=os.environ.get("OUT", "/tmp/speed_suite"))
    a.add_argument("--deadline", type=float, default=560.0, help="seconds for the whole suite")
    a.add_argument("--gpu-gib", type=float, help="memory budget of one warm wave (default: 92%% of the GPU's)")
    a.add_argument("--baseline", help="directory holding another gpt3d package, for the jobs marked base")
    a.add_argument("--only", nargs="*", help="job names (substrings) to run")
    a.add_argument("--dry", action="store_true", help="print the commands and stop")
    args = a.parse_args()
    t0 = time.time()
    end = t0 + args.deadline
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    here = Path.cwd()
    jobs = [j for j in plans()[args.plan] if not args.only or any(s in j.name for s in args.only)]
    if args.dry:
        for j in jobs:
            print(j.name, ":", " ".join(command(j, Path("DATA"), Path("RUN"), False)))
        return 0
    data = prepare_data(Path(args.data_dir), out)
    log = open(out / "suite_log.txt", "w")
    results = open(out / "suite.jsonl", "a")
    rows = []

    def record(job, tag, r, wall):
        row = {"job": tag + job.name, "kind": job.kind, "shape": job.shape, "mbs": job.mbs, "micro": job.micro,
               "seq": job.seq, "prec": job.prec, "drop": job.drop, "wall_s": round(wall, 1), **r}
        rows.append(row)
        results.write(json.dumps(row) + "\n")
        results.flush()
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)

    # warm waves: distinct graphs compiled side by side (and the loss curves run to the end)
    budget = args.gpu_gib or gpu_gib()
    for wave in waves([j for j in jobs if j.warm], budget):
        if time.time() > end - 60:
            break
        if len(wave) == 1 and wave[0].kind != "curve":   # nothing to share the GPU with: its timed run compiles it
            print(json.dumps({"warm": wave[0].name, "skipped": f"alone in a wave of {budget:.0f} GiB"}), flush=True)
            continue
        started = [(j, *run_one(j, here, data, out, "warm:", j.kind != "curve", 420), time.time()) for j in wave]
        for j, p, run_dir, limit, t in started:
            r = finish(p, j, run_dir, min(limit, end), log)
            if j.kind == "curve":
                record(j, "", r, time.time() - t)
            else:
                print(json.dumps({"warm": j.name, "s": round(time.time() - t, 1), "error": r.get("error")}), flush=True)
    # timed jobs, one at a time
    timed = [(j, here, "") for j in jobs if j.kind != "curve"]
    if args.baseline:
        timed += [(j, Path(args.baseline).resolve(), "base:") for j in jobs if j.base]
    for j, cwd, tag in timed:
        if time.time() > end - START_MARGIN_S:   # a cached graph still takes ~30-60 s to load and step
            record(j, tag, {"error": "skipped: suite deadline"}, 0.0)
            continue
        t = time.time()
        p, run_dir, limit = run_one(j, cwd, data, out, tag, False, 300)
        record(j, tag, finish(p, j, run_dir, min(limit, end), log), time.time() - t)
    log.close()
    print(f"\nsuite '{args.plan}' done in {time.time() - t0:.0f} s\n")
    print("| job | tokens/s | MFU | peak GiB | peer tok/s (mbs) | vs peer | wall s | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tok = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else ""
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else ""
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") else ""
        peer = f"{r['peer_tokens_per_s']:,.0f} ({r.get('peer_micro')})" if r.get("peer_tokens_per_s") else ""
        vs = f"{r['vs_peer']:.2f}x" if r.get("vs_peer") else ""
        note = r.get("error") or (f"final loss {r['losses'][-1][1]}" if r.get("losses") else "")
        note += " GEMMs: tuned cuBLASLt" if r.get("gemm_tuning") else ""
        note += f", quack epilogues ({r['quack_epilogues']})" if r.get("quack_epilogues") else ""
        print(f"| {r['job']} | {tok} | {mfu} | {mem} | {peer} | {vs} | {r['wall_s']} | {note} |")
    for line in ratios(rows):
        print("RATIO", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
