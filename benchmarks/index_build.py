"""Time and peak memory of building the GPT sample index (and the blend) on a synthetic corpus.

    python benchmarks/index_build.py --tokens 150e9 --samples 73e6       # the issue's 150B-token case
    python benchmarks/index_build.py --tokens 15e9 --samples 7.3e6       # a tenth of it
    python benchmarks/index_build.py --blend 146e6                       # the 3-corpus greedy blend

Document lengths are log-normal (mean --mean-doc tokens), so the corpus has
tokens / mean-doc documents. Each variant runs in a fresh process, so its peak
RSS (ru_maxrss) is its own. `previous` is the index rule gpt3d used before it
matched Megatron-DeepSpeed (one shuffle, searchsorted), kept here as a baseline.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import time

import numpy as np


def synthetic_sizes(tokens: int, mean_doc: float, seed: int = 0) -> np.ndarray:
    n = max(1, int(tokens / mean_doc))
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(mean=math.log(mean_doc) - 0.5, sigma=1.0, size=n)
    sizes *= tokens / sizes.sum()
    sizes = np.maximum(sizes, 1).astype(np.int32)
    sizes[0] += tokens - int(sizes.sum(dtype=np.int64))
    return sizes


def previous_rules(documents, sizes, num_samples, seq_length, seed):
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    epochs = max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))
    rng = np.random.RandomState(seed)
    doc_idx = np.tile(np.asarray(documents, dtype=np.int64), epochs)
    rng.shuffle(doc_idx)
    lengths = sizes[doc_idx]
    cum = np.concatenate([[0], np.cumsum(lengths)])
    pos = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    doc_i = np.searchsorted(cum, pos, side="right") - 1
    sample_idx = np.stack([doc_i, pos - cum[doc_i]], axis=1).astype(np.int64)
    shuffle_idx = rng.permutation(num_samples).astype(np.int64)
    return {"doc": doc_idx, "sample": sample_idx, "shuffle": shuffle_idx}


def _run(kind: str, args, queue) -> None:
    if kind == "blend":
        from gpt3d.data.blend import blending_indices
        w = np.array([0.2, 0.5, 0.3])
        t0 = time.perf_counter()
        d, _ = blending_indices(w / w.sum(), int(args.blend))
        seconds = time.perf_counter() - t0
        extra = {"samples": int(args.blend), "corpora": 3}
    else:
        from gpt3d.data.gpt_dataset import build_index_mappings
        sizes = synthetic_sizes(int(args.tokens), args.mean_doc)
        docs = np.arange(len(sizes), dtype=np.int32)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        build = build_index_mappings if kind == "megatron" else previous_rules
        t0 = time.perf_counter()
        out = build(docs, sizes, int(args.samples), args.seq, 1234)
        seconds = time.perf_counter() - t0
        extra = {"documents": len(sizes), "tokens": int(args.tokens), "samples_indexed": len(out["sample"]) - 1,
                 "rss_before_build_gib": round(base / 2 ** 20, 2)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB -> GiB
    queue.put({"variant": kind, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 2), **extra})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=15e9)
    p.add_argument("--samples", type=float, default=7.3e6)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mean-doc", type=float, default=1000.0)
    p.add_argument("--blend", type=float, default=0, help="also time the greedy blend for this many samples")
    p.add_argument("--variants", default="megatron,previous")
    args = p.parse_args()
    kinds = [k for k in args.variants.split(",") if k] + (["blend"] if args.blend else [])
    ctx = mp.get_context("fork")
    for kind in kinds:
        q = ctx.Queue()
        proc = ctx.Process(target=_run, args=(kind, args, q))
        proc.start()
        print(json.dumps(q.get()), flush=True)
        proc.join()


if __name__ == "__main__":
    main()
