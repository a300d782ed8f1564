"""Whether a checkpoint is intact: per-file checksums, a finiteness scan of the tensors, and the verdict.

Sizes alone let flipped bytes through (a model shard with 64 corrupted bytes loaded silently and evaluated to
a loss of 1e36). So every file gets an xxh3-128 checksum in meta.json when it is written (read back right
after the write, while it is still in the page cache; xxh3 runs at ~20 GB/s on one core, so the cost is the
read-back, see benchmarks/RESULTS.md), and every floating tensor written is summed before it goes to disk:
one that is not finite puts the file under meta.json "non_finite". A checkpoint is *good* when its
meta.json is readable, every file has its recorded size and checksum, and nothing is marked non-finite;
checkpoints written before checksums existed are checked by size only (and still by the finiteness check of
the loaded state, see parts.py).

meta.json is checked first (meta_check.py: a JSON object of the expected shape, listing only paths inside
the directory), and nothing in the directory that it does not list is allowed: a stray file (another
run's shard, a planted pickle) makes the checkpoint bad instead of being read.

meta.json checks itself too: "meta_checksum" is the xxh3-128 of its own canonical JSON (sorted keys, no
spaces) without that key, so a flipped digit in the iteration, token count or a recorded size is caught as a
corrupt meta.json. Checkpoints written before it existed have no such key and are read as before.

`problem` gives the first reason a checkpoint is not good (None if it is). Training verifies the files split
over its ranks and agrees on one verdict; read-only commands verify what they read.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional
from collections.abc import Callable, Iterable

import torch
import xxhash

from ..files.checksum import ALGORITHM, file_checksum
from ..console.progress import Progress
from .meta_check import meta_problem


def non_finite(tensors: dict) -> list[str]:
    """Names of the floating tensors holding a NaN or an infinity.

    One sum in the tensor's own dtype each (~20 GB/s on one core, no temporaries): a finite sum proves every
    element finite; only a non-finite sum (a NaN/inf, or a sum beyond the dtype's range) is confirmed
    element by element."""
    return [name for name, t in tensors.items()
            if t.is_floating_point() and t.numel() and not _finite(t)]


def _finite(t: torch.Tensor) -> bool:
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


META_CHECKSUM = "meta_checksum"


def meta_checksum(meta: dict) -> str:
    """'xxh3_128:<hex>' of meta's canonical JSON, without its own META_CHECKSUM entry. `meta` must be as
    json.load returns it (string keys, lists), so the writer hashes its round-tripped meta."""
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return f"{ALGORITHM}:{xxhash.xxh3_128_hexdigest(text.encode())}"


def with_meta_checksum(meta: dict) -> dict:
    """`meta` as it will read back from JSON, with its META_CHECKSUM."""
    meta = json.loads(json.dumps(meta))
    meta[META_CHECKSUM] = meta_checksum(meta)
    return meta


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as fh:
        return json.load(fh)


def structure_problem(path: str) -> Optional[str]:
    """Why the directory is not a complete checkpoint (missing/unreadable/malformed meta.json, missing or
    truncated files, a file meta.json does not list, files marked non-finite when written), or None. Cheap:
    reads meta.json, file sizes and the directory's names only."""
    if not os.path.exists(os.path.join(path, "meta.json")):
        return "no meta.json (incomplete save)"
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return f"unreadable meta.json ({e})"
    if not isinstance(meta, dict):
        return meta_problem(meta)
    want = meta.get(META_CHECKSUM)
    got = meta_checksum(meta) if want is not None else None
    if got is not None and got != want:
        return (f"meta.json is corrupt (checksum {got.split(':')[1][:12]}..., recorded "
                f"{str(want).split(':')[-1][:12]}...)")
    why = meta_problem(meta)
    if why:
        return why
    for fname, size in meta["files"].items():
        fp = os.path.join(path, fname)
        if not os.path.isfile(fp):
            return f"missing {fname}"
        if os.path.getsize(fp) != size:
            return f"{fname} has {os.path.getsize(fp)} bytes, expected {size} (truncated?)"
    stray = unlisted(path, meta["files"])
    if stray:
        return (f"{stray[0]} is not listed in meta.json (not written by this checkpoint's save: it is never "
                f"read; remove it{f' and {len(stray) - 1} more' if len(stray) > 1 else ''})")
    for fname, names in meta.get("non_finite", {}).items():
        return f"{fname} holds non-finite values ({', '.join(names[:3])}) since it was written"
    return None


def unlisted(path: str, files: dict) -> list[str]:
    """The entries under the checkpoint directory `path` that are neither meta.json, a listed file, nor a
    directory holding one (sorted, relative paths)."""
    keep = {"meta.json", *files}
    keep |= {os.path.dirname(f) for f in files if os.path.dirname(f)}
    out = []
    for d, dirs, names in os.walk(path):
        for n in dirs + names:
            rel = os.path.relpath(os.path.join(d, n), path)
            if rel not in keep:
                out.append(rel)
        dirs[:] = [n for n in dirs if os.path.relpath(os.path.join(d, n), path) in keep]
    return sorted(out)


def checksum_problem(path: str, files: Iterable[str], progress: bool = True) -> Optional[str]:
    """Why one of `files` (names inside the checkpoint) does not match its recorded checksum, or None.
    `progress`: report the bytes read on stderr (gpt3d/console/progress.py; a large checkpoint takes minutes)."""
    recorded = read_meta(path).get("checksums", {})
    files = [f for f in files if recorded.get(f) is not None]   # files written before checksums: sizes only
    total = sum(os.path.getsize(os.path.join(path, f)) for f in files) / 2 ** 20
    with Progress(f"verifying {path}", total, "MB", enabled=progress) as bar:
        for fname in files:
            want = recorded[fname]
            got = file_checksum(os.path.join(path, fname), lambda n: bar.update(n / 2 ** 20))
            if got != want:
                return (f"{fname} is corrupt (checksum {got.split(':')[1][:12]}..., recorded "
                        f"{want.split(':')[1][:12]}...)")
    return None


def checked_files(path: str, wanted: Optional[Callable[[str], bool]] = None) -> list[str]:
    """The files of the checkpoint whose checksums a verification reads, sorted (all, or those `wanted`)."""
    return sorted(f for f in read_meta(path).get("files", {}) if wanted is None or wanted(f))


def problem(path: str, wanted: Optional[Callable[[str], bool]] = None) -> Optional[str]:
    """Why the checkpoint at `path` is not good, or None: structure, then the checksums of every file (or of
    those `wanted`)."""
    return structure_problem(path) or checksum_problem(path, checked_files(path, wanted))


def files_read_for_inference(fname: str) -> bool:
    """The files export, eval and generate read: the model shards and the tokenizer's copy, not the
    optimizer state."""
    return fname.startswith(("model_", "tokenizer/"))


def describe_files(path: str) -> tuple[int, int, bool]:
    """(number of files, bytes, every file has a checksum) of a complete checkpoint."""
    meta = read_meta(path)
    files = meta.get("files", {})
    return len(files), sum(files.values()), all(f in meta.get("checksums", {}) for f in files)
