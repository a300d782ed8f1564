"""What checkpoint integrity costs: write, checksum, non-finite scan and verify of one multi-GB shard.

The checkpoint Writer (gpt3d/checkpoint/store.py) scans each floating tensor for non-finite values (a
float64 sum) before writing, writes the safetensors file, reads it back for its xxh3-128 checksum (from the
page cache) and fsyncs; loading verifies the checksum by reading the file once more. This times each step
on one shard of random fp32 tensors (default 2 GiB, 64 MiB tensors), compares xxh3 with hashlib's sha256 and
blake2b, and scales the result to a full 1.3B checkpoint (bf16 weights + fp32 masters and Adam moments) by
its byte count.

    python benchmarks/checkpoint_hash.py --gib 2 --dir /tmp --repeat 3
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time

import torch
from safetensors.torch import save_file

from gpt3d.checkpoint.integrity import file_checksum, non_finite
from gpt3d.config import Config
from gpt3d.files.atomic import fsync_file
from gpt3d.model.gpt import count_parameters


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def hashlib_file(path: str, name: str) -> None:
    h = hashlib.new(name)
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    n = int(args.gib * 16)
    tensors = {f"layer{i}.weight": torch.randn(4096, 4096) for i in range(n)}   # 64 MiB each
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    path = os.path.join(args.dir, "gpt3d_hash_bench.safetensors")
    rows = {k: [] for k in ("scan", "write", "checksum", "fsync", "verify", "sha256", "blake2b")}
    try:
        for _ in range(args.repeat):
            if os.path.exists(path):
                os.remove(path)
            rows["scan"].append(timed(lambda: non_finite(tensors)))
            rows["write"].append(timed(lambda: save_file(tensors, path)))
            rows["checksum"].append(timed(lambda: file_checksum(path)))
            rows["fsync"].append(timed(lambda: fsync_file(path)))
            rows["verify"].append(timed(lambda: file_checksum(path)))
            rows["sha256"].append(timed(lambda: hashlib_file(path, "sha256")))
            rows["blake2b"].append(timed(lambda: hashlib_file(path, "blake2b")))
    finally:
        if os.path.exists(path):
            os.remove(path)
    gb = nbytes / 1e9
    print(f"shard: {n} fp32 tensors of 4096x4096, {gb:.2f} GB, {args.repeat} repeats (median seconds, GB/s)")
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in med.items():
        print(f"  {k:9s} {v:7.3f} s  {gb / v:6.2f} GB/s")
    save_plain = med["write"] + med["fsync"]
    extra = med["scan"] + med["checksum"]
    print(f"save: write+fsync {save_plain:.2f} s, integrity adds {extra:.2f} s ({extra / save_plain:.1%}); "
          f"load: verify reads the file once more, {med['verify']:.2f} s")
    cfg = Config.from_dict({"num_layers": 24, "hidden_size": 2048, "num_attention_heads": 16, "seq_length": 2048})
    params = count_parameters(cfg.model, 50257)["total"]
    full = params * (2 + 12)   # bf16 weights; fp32 master, exp_avg, exp_avg_sq
    scale = full / nbytes
    print(f"1.3B ({params / 1e9:.3f}B parameters): {full / 1e9:.1f} GB per checkpoint -> write+fsync "
          f"{save_plain * scale:.0f} s, integrity +{extra * scale:.1f} s on save (scan of the fp32 part "
          f"{med['scan'] * params * 12 / nbytes:.1f} s + checksum {med['checksum'] * scale:.1f} s), "
          f"+{med['verify'] * scale:.1f} s on load (one process; split over the job's ranks)")


if __name__ == "__main__":
    main()
