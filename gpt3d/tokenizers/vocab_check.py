"""Token ids must fit the model's vocabulary: checked once per data file before training starts.

An id outside [0, vocab) (int32 data from a bigger tokenizer, say) used to surface mid-run as a 66-line
IndexError from the embedding. `check_token_ids` reads the tokens of the documents the run uses (one
contiguous span of the .bin: the split ranges in use) through the numpy memmap in blocks of 64M tokens,
vectorised, and caches the span's smallest and largest id beside the .bin. One rank computes while the
others wait.

The cache is keyed by the .bin's content: an xxh3-128 checksum of the whole file (files/checksum.py), so a file
rewritten in place with the same size and its old modification time restored is caught. Re-hashing the
.bin on every run would cost a read of it, so the cache also records the file's identity when it was
hashed (size, modification and change times, inode): while that is unchanged, the recorded checksum
stands. Writing to the file, or setting its times back, updates its change time (ctime), which no user
call can set; a changed identity means one checksum read, and the range is recomputed only if the
content changed too.
"""
from __future__ import annotations

import json
import os
from typing import Optional
from collections.abc import Callable

from ..files import atomic
from ..files.checksum import file_checksum
from ..errors import DataError
from ..console.progress import Progress
from ..data.indexed import MMapIndexedDataset

_BLOCK = 64 << 20


def id_range(indexed: MMapIndexedDataset, lo: int, hi: int) -> tuple[int, int]:
    """(smallest, largest) token id of documents [lo, hi) (documents lie in order in the .bin)."""
    start, end = _token_span(indexed, lo, hi)
    smallest, largest = None, None
    with Progress(f"checking the token ids of {indexed.prefix}.bin", end - start, "tokens") as bar:
        for a in range(start, end, _BLOCK):
            block = indexed.bin[a:min(a + _BLOCK, end)]
            bmin, bmax = int(block.min()), int(block.max())
            smallest = bmin if smallest is None else min(smallest, bmin)
            largest = bmax if largest is None else max(largest, bmax)
            bar.update(len(block))
    return (0, -1) if largest is None else (smallest, largest)


def _identity(path: str) -> dict:
    """What changes whenever the file's content can have changed (ctime: any write, or a reset of its times)."""
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _read_cache(path: str) -> Optional[dict]:
    """The cache file's entry, or None if there is none or it is not one (the cache is a file gpt3d reads)."""
    try:
        with open(path) as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        return None
    ok = (isinstance(saved, dict) and isinstance(saved.get("bin"), dict) and isinstance(saved.get("checksum"), str)
          and isinstance(saved.get("span"), list) and isinstance(saved.get("range"), list)
          and len(saved["range"]) == 2 and all(type(x) is int for x in saved["range"]))
    return saved if ok else None


def _cached_id_range(indexed: MMapIndexedDataset, lo: int, hi: int, compute: bool) -> Optional[tuple[int, int]]:
    bin_path = indexed.prefix + ".bin"
    cache = f"{indexed.prefix}_token_ids_{lo}-{hi}.json"
    span = [lo, hi, *_token_span(indexed, lo, hi)]
    saved = _read_cache(cache)
    identity = _identity(bin_path)   # before hashing: a write during the hash changes it for the next run
    if saved is not None and saved["span"] == span and saved["bin"] == identity:
        return tuple(saved["range"])   # the file is as it was when its checksum was taken
    if not compute:
        return None
    checksum = file_checksum(bin_path)
    if saved is not None and saved["span"] == span and saved["checksum"] == checksum:
        found = tuple(saved["range"])   # moved or touched, same content
    else:
        found = id_range(indexed, lo, hi)
    try:
        with atomic.replacing(cache) as tmp, open(tmp, "w") as fh:
            json.dump({"bin": identity, "checksum": checksum, "span": span, "range": list(found)}, fh)
    except OSError:
        pass   # a read-only data directory: no cache, the check still holds
    return found


def _token_span(indexed: MMapIndexedDataset, lo: int, hi: int) -> tuple[int, int]:
    """[first, end) token offsets in the .bin of documents [lo, hi)."""
    if hi <= lo:
        return 0, 0
    return (int(indexed.pointers[lo]) // indexed.dtype.itemsize,
            int(indexed.pointers[hi - 1]) // indexed.dtype.itemsize + int(indexed.sizes[hi - 1]))


def check_token_ids(indexed: MMapIndexedDataset, lo: int, hi: int, vocab_size: int, *, is_builder: bool = True,
                    barrier: Optional[Callable[[], None]] = None) -> None:
    """DataError naming the file if documents [lo, hi) hold an id outside [0, vocab_size)."""
    found = _cached_id_range(indexed, lo, hi, compute=is_builder)
    if barrier:   # every rank calls it exactly once
        barrier()
    if found is None:
        found = _cached_id_range(indexed, lo, hi, compute=True)
    smallest, largest = found
    if largest >= vocab_size or smallest < 0:
        bad = largest if largest >= vocab_size else smallest
        raise DataError(f"{indexed.prefix}.bin holds token id {bad}, outside the model's vocabulary of {vocab_size} "
                        f"ids (0-{vocab_size - 1}): tokenized with another tokenizer? (see --vocab-file, "
                        "--vocab-size)")
