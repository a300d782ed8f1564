"""`gpt3d preprocess` against its ceiling: the tokenizer's own batch encode, one thread, times the workers.

For each tokenizer (GPT-2 BPE from vocab.json/merges.txt, and a HuggingFaceTokenizer: a 32k byte-level BPE
with a <s> post-processor trained here on the same text) it measures, on one generated JSONL input:
  ceiling  HF `tokenizers` encode_batch over the input's texts in one process (TOKENIZERS_PARALLELISM=false),
           batches of the size preprocess uses, texts already in memory; measured before and after the runs
  w=1, w=2 `python -m gpt3d preprocess --workers N` on the file (wall time of the whole command)
and prints MB/s (input JSONL bytes), tokens/s, peak RSS, and preprocess / (ceiling x workers). The ceiling is
taken both with `encode_batch` (the issue's reference) and `encode_batch_fast` (no offsets; what preprocess
calls). On a shared machine wall times swing with the neighbours' load, so CPU seconds are recorded too:
tokens per CPU-second of the whole preprocess process tree (reader + workers) against the ceiling's, and, the
steadiest figure, a worker's CPU time per chunk against encode_batch's on the same chunks (same process,
alternating, best of 7 rounds).

    python benchmarks/preprocess_speed.py --size-mb 100 --data /work/shared/data --out /tmp/pp_bench
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"


def make_input(data: str, path: str, size_mb: float) -> None:
    """JSONL of paragraphs of the reference texts (shuffled, repeated until the size is reached)."""
    paras = []
    for name, sep in (("tinyshakespeare.txt", "\n\n"), ("wikitext-2-valid.txt", "\n"), ("wikitext-2-test.txt", "\n")):
        with open(os.path.join(data, name), encoding="utf-8") as fh:        # wikitext: a paragraph per line
            paras += [p for p in fh.read().split(sep) if p.strip()]
    docs = ["\n".join(paras[i:i + 4]) for i in range(0, len(paras), 4)]    # 1.3 KB documents on average
    rng, written = random.Random(0), 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size_mb * 2 ** 20:
            rng.shuffle(docs)
            for d in docs:
                line = json.dumps({"text": d}) + "\n"
                fh.write(line)
                written += len(line.encode())
                if written >= size_mb * 2 ** 20:
                    break


def train_hf_tokenizer(data: str, out_dir: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    texts = []
    for name in ("tinyshakespeare.txt", "wikitext-2-valid.txt", "wikitext-2-test.txt"):
        with open(os.path.join(data, name), encoding="utf-8") as fh:
            texts += fh.read().split("\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=32000, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return out_dir


def ceiling(tok, path: str, batch_docs: int, fast: bool) -> dict:
    """Batch encode of the input's texts, one process, one thread (texts read beforehand, not timed)."""
    with open(path, encoding="utf-8") as fh:
        texts = [json.loads(ln)["text"] for ln in fh]
    nbytes = os.path.getsize(path)
    encode = tok.tok.encode_batch_fast if fast else tok.tok.encode_batch
    special = tok.type_name != "GPT2BPETokenizer"
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for i in range(0, len(texts), batch_docs):
        tokens += sum(len(e.ids) for e in encode(texts[i:i + batch_docs], add_special_tokens=special))
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": secs, "mb_per_s": nbytes / 2 ** 20 / secs, "tokens": tokens, "tokens_per_s": tokens / secs,
            "tokens_per_cpu_s": tokens / cpu}


WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr); sys.exit(r.returncode)")


def worker_efficiency(spec: dict, path: str, rounds: int = 7) -> dict:
    """CPU seconds of preprocess's worker path (decode + validate + batch encode + numpy) on 3 chunks vs
    encode_batch / encode_batch_fast on the same texts; alternating rounds, best of each."""
    from gpt3d.data import corpus
    from gpt3d.data import preprocess as pp
    pp._init(spec, ["text"], False)
    tok = pp._state["tok"]
    special = tok.type_name != "GPT2BPETokenizer"
    chunks = [c for _, c in zip(range(3), corpus.chunks(path, ["text"]))]
    texts = [corpus.decode(c, ["text"])[0]["text"] for c in chunks]
    variants = {"encode_batch": lambda: [tok.tok.encode_batch(t, add_special_tokens=special) for t in texts],
                "encode_batch_fast": lambda: [tok.tok.encode_batch_fast(t, add_special_tokens=special) for t in texts],
                "worker": lambda: [pp._encode_chunk(c) for c in chunks]}
    best = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            cpu = time.process_time()
            fn()
            best[name] = min(best.get(name, float("inf")), time.process_time() - cpu)
    return {"worker_vs_encode_batch": best["encode_batch"] / best["worker"],
            "worker_vs_encode_batch_fast": best["encode_batch_fast"] / best["worker"], "cpu_s": best}


def run_preprocess(flags: list, path: str, out: str, workers: int) -> dict:
    """Wall time of the whole command; peak RSS = the largest of its processes (main or a worker)."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAP, sys.executable, "-m", "gpt3d", "preprocess", "--input", path,
                        "--output-prefix", out, "--workers", str(workers), "--log-interval", "10000000", *flags],
                       capture_output=True, text=True)
    secs = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(r.stderr)
    summary = r.stdout.strip().splitlines()[-1]
    tokens = int(summary.split(" tokens (")[0].split(", ")[-1].replace(",", ""))
    rss_kb, cpu = r.stderr.strip().splitlines()[-1].split()
    return {"seconds": secs, "mb_per_s": os.path.getsize(path) / 2 ** 20 / secs, "tokens": tokens,
            "tokens_per_s": tokens / secs, "peak_rss_mb": int(rss_kb) / 1024, "cpu_s": float(cpu),
            "tokens_per_cpu_s": tokens / float(cpu), "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/shared/data", help="gpt2-vocab.json, gpt2-merges.txt and texts")
    p.add_argument("--out", default="/tmp/preprocess_bench")
    p.add_argument("--size-mb", type=float, default=100)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizers", nargs="+", default=["gpt2", "hf"], choices=["gpt2", "hf"])
    args = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from gpt3d.data import corpus
    from gpt3d.tokenizers.factory import build_tokenizer
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"docs_{args.size_mb:g}mb.jsonl")
    if not os.path.exists(path):
        make_input(args.data, path, args.size_mb)
    print(f"input {path}: {os.path.getsize(path) / 2 ** 20:.1f} MB, cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    with open(path, encoding="utf-8") as fh:
        batch_docs = max(1, int(corpus.CHUNK_BYTES / (os.path.getsize(path) / sum(1 for _ in fh))))
    rows = []
    for name in args.tokenizers:
        if name == "gpt2":
            flags = ["--vocab-file", os.path.join(args.data, "gpt2-vocab.json"),
                     "--merge-file", os.path.join(args.data, "gpt2-merges.txt")]
            tok = build_tokenizer(flags[1], flags[3])
        else:
            model = train_hf_tokenizer(args.data, os.path.join(args.out, "hf_tok"))
            flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", model]
            tok = build_tokenizer(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=model)
        spec = (dict(vocab_file=flags[1], merge_file=flags[3]) if name == "gpt2"
                else dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=flags[3]))
        eff = worker_efficiency(spec, path)
        print(f"{name} worker CPU per chunk: {eff['worker_vs_encode_batch']:.0%} of encode_batch's speed, "
              f"{eff['worker_vs_encode_batch_fast']:.0%} of encode_batch_fast's {eff['cpu_s']}", flush=True)
        c1 = {fast: ceiling(tok, path, batch_docs, fast) for fast in (False, True)}
        print(f"{name} ceiling: encode_batch {c1[False]['mb_per_s']:.2f} MB/s, encode_batch_fast "
              f"{c1[True]['mb_per_s']:.2f} MB/s", flush=True)
        runs = {}
        for w in args.workers:
            runs[w] = run_preprocess(flags, path, os.path.join(args.out, f"{name}_w{w}"), w)
            print(f"{name} workers={w}: {runs[w]['summary']}", flush=True)
        c2 = {fast: ceiling(tok, path, batch_docs, fast) for fast in (False, True)}
        print(f"{name} ceiling again: {c2[False]['mb_per_s']:.2f} / {c2[True]['mb_per_s']:.2f} MB/s", flush=True)
        ceil = {fast: {k: (c1[fast][k] + c2[fast][k]) / 2 for k in ("mb_per_s", "tokens_per_s", "tokens_per_cpu_s")}
                for fast in (False, True)}
        for w, r in runs.items():
            assert r["tokens"] == c1[False]["tokens"], (r["tokens"], c1[False]["tokens"])
            rows.append({"tokenizer": name, "workers": w, "mb_per_s": r["mb_per_s"], "tokens_per_s": r["tokens_per_s"],
                         "ceiling_mb_per_s": ceil[False]["mb_per_s"],
                         "ceiling_tokens_per_s": ceil[False]["tokens_per_s"],
                         "ceiling_fast_mb_per_s": ceil[True]["mb_per_s"],
                         "of_ceiling_x_workers": r["tokens_per_s"] / (ceil[False]["tokens_per_s"] * w),
                         "of_fast_ceiling_x_workers": r["tokens_per_s"] / (ceil[True]["tokens_per_s"] * w),
                         "cpu_efficiency": r["tokens_per_cpu_s"] / ceil[False]["tokens_per_cpu_s"],
                         "cpu_efficiency_fast": r["tokens_per_cpu_s"] / ceil[True]["tokens_per_cpu_s"],
                         "peak_rss_mb": r["peak_rss_mb"], "seconds": r["seconds"], "cpu_s": r["cpu_s"],
                         "worker_vs_encode_batch": eff["worker_vs_encode_batch"]})
    print("\n| tokenizer | workers | preprocess MB/s | tokens/s | ceiling MB/s encode_batch (fast) | "
          "/ (ceiling x workers) (fast) | tokens per CPU-s vs ceiling (fast) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['workers']} | {r['mb_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['ceiling_mb_per_s']:.2f} ({r['ceiling_fast_mb_per_s']:.2f}) | {r['of_ceiling_x_workers']:.0%} "
              f"({r['of_fast_ceiling_x_workers']:.0%}) | {r['cpu_efficiency']:.0%} ({r['cpu_efficiency_fast']:.0%}) | "
              f"{r['peak_rss_mb']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
