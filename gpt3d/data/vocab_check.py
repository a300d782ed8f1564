"""Token ids must fit the model's vocabulary: checked once per data file before training starts.

An id outside [0, vocab) (int32 data from a bigger tokenizer, say) used to surface mid-run as a 66-line
IndexError from the embedding. `check_token_ids` reads the tokens of the documents the run uses (one
contiguous span of the .bin: the split ranges in use) through the numpy memmap in blocks of 64M tokens,
vectorised, and caches the span's smallest and largest id beside the .bin, keyed by the .bin's size and
modification time, so a later run costs one stat. One rank computes while the others wait.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from .. import atomic
from ..errors import DataError
from ..progress import Progress
from .indexed import MMapIndexedDataset

_BLOCK = 64 << 20


def id_range(indexed: MMapIndexedDataset, lo: int, hi: int) -> tuple[int, int]:
    """(smallest, largest) token id of documents [lo, hi) (documents lie in order in the .bin)."""
    if hi <= lo:
        return 0, -1
    start = int(indexed.pointers[lo]) // indexed.dtype.itemsize
    end = int(indexed.pointers[hi - 1]) // indexed.dtype.itemsize + int(indexed.sizes[hi - 1])
    smallest, largest = None, None
    with Progress(f"checking the token ids of {indexed.prefix}.bin", end - start, "tokens") as bar:
        for a in range(start, end, _BLOCK):
            block = indexed.bin[a:min(a + _BLOCK, end)]
            bmin, bmax = int(block.min()), int(block.max())
            smallest = bmin if smallest is None else min(smallest, bmin)
            largest = bmax if largest is None else max(largest, bmax)
            bar.update(len(block))
    return (0, -1) if largest is None else (smallest, largest)


def _cached_id_range(indexed: MMapIndexedDataset, lo: int, hi: int, compute: bool) -> Optional[tuple[int, int]]:
    bin_path = indexed.prefix + ".bin"
    st = os.stat(bin_path)
    key = {"bin_bytes": st.st_size, "bin_mtime_ns": st.st_mtime_ns, "documents": [lo, hi]}
    cache = f"{indexed.prefix}_token_ids_{lo}-{hi}.json"
    try:
        with open(cache) as fh:
            saved = json.load(fh)
        if saved.get("key") == key:
            return tuple(saved["range"])
    except (OSError, ValueError):
        pass
    if not compute:
        return None
    found = id_range(indexed, lo, hi)
    try:
        with atomic.replacing(cache) as tmp, open(tmp, "w") as fh:
            json.dump({"key": key, "range": list(found)}, fh)
    except OSError:
        pass   # a read-only data directory: no cache, the check still holds
    return found


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
