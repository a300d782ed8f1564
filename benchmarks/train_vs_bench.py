"""Is `gpt3d train` on real .bin/.idx data as fast as `gpt3d bench`'s synthetic step? (one GPU)

Tokenizes a text file into Megatron .bin/.idx with `gpt3d preprocess` (GPT-2 BPE), then for each shape runs
`gpt3d bench --peer none` and `gpt3d train` on that data with the same shape, micro-batch and precision, and
prints both tokens/s and their ratio. The train figure is the median over the log lines after the first (which
holds compilation); the bench figure is bench's own timed window.

    python benchmarks/train_vs_bench.py --data-dir /path/with/gpt2-vocab.json,gpt2-merges.txt,text.txt \
        --shapes 125M --iters 40 --out /tmp/tvb
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SHAPES = {   # the bench shapes (gpt3d/bench.py), as train flags
    "125M": ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
             "--micro-batch-size", "16"],
    "1.3B": ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16",
             "--micro-batch-size", "8"],
}


def sh(cmd: list) -> str:
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True, help="gpt2-vocab.json, gpt2-merges.txt and a .txt corpus")
    p.add_argument("--text", default="tinyshakespeare.txt")
    p.add_argument("--shapes", nargs="+", default=["125M"])
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--out", default="/tmp/train_vs_bench")
    a = p.parse_args()
    d, out = Path(a.data_dir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    paras = [x for x in (d / a.text).read_text().split("\n\n") if x.strip()]
    (out / "corpus.jsonl").write_text("".join(json.dumps({"text": x + "\n\n"}) + "\n" for x in paras))
    tok = ["--vocab-file", str(d / "gpt2-vocab.json"), "--merge-file", str(d / "gpt2-merges.txt")]
    py = [sys.executable, "-m", "gpt3d"]
    sh([*py, "preprocess", "--input", str(out / "corpus.jsonl"), "--output-prefix", str(out / "corpus"), *tok,
        "--json-keys", "text", "--append-eod", "--workers", "4"])
    rows = []
    for shape in a.shapes:
        bench = json.loads(sh([*py, "bench", "--model", shape, "--peer", "none", "--json", "--iters", "10",
                               "--warmup", "3", "--micro-batches", str(a.micro_batches)]).splitlines()[0])
        mbs = SHAPES[shape][-1]
        log = out / f"train_{shape}.jsonl"
        log.unlink(missing_ok=True)
        sh([*py, "train", *SHAPES[shape], "--global-batch-size", str(int(mbs) * a.micro_batches),
            "--seq-length", "2048", "--max-position-embeddings", "2048", "--bf16", "--compile",
            "--no-mock-data", "--data-path", str(out / "corpus_text_document"), *tok, "--split", "98,2,0",
            "--train-iters", str(a.iters), "--log-interval", "10", "--eval-interval", "100000", "--eval-iters", "0",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-4", "--weight-decay", "0.1",
            "--log-file", str(log), "--no-exit-signal-handler"])
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        steady = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x][1:]
        train = statistics.median(steady)
        rows.append((shape, bench["tokens_per_s"], train, bench["peak_mem_gib"]))
    print("\n| shape | micro-batches | bench tok/s | train tok/s (real .bin/.idx) | train / bench | bench peak GiB |")
    print("|---|---|---|---|---|---|")
    for shape, b, t, mem in rows:
        print(f"| {shape} | {a.micro_batches} | {b:,.0f} | {t:,.0f} | {t / b:.3f} | {mem:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
