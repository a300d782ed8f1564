"""Megatron's GPT dataset: fixed-length samples cut across document boundaries.

Documents of a split are repeated for enough epochs and shuffled (doc_idx);
sample k starts at token k*seq of that stream and spans seq+1 tokens, so
consecutive samples share one token (sample_idx); samples are shuffled
(shuffle_idx). The three index arrays depend only on the data, the split, the
sample count, the sequence length and the seed; they are cached as .npy beside
the data, built by one rank while the others wait.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Callable, Optional

import numpy as np
from torch.utils.data import Dataset

from .blend import BlendableDataset
from .indexed import DataError, MMapIndexedDataset


def parse_data_path(data_path) -> tuple[list[str], list[float]]:
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if len(items) == 1:
        return items, [1.0]
    if len(items) % 2:
        raise DataError(f"--data-path with weights needs pairs 'weight prefix', got {items}")
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        raise DataError(f"--data-path: expected 'weight prefix' pairs, got {items}") from None
    total = sum(weights)
    if total <= 0 or min(weights) < 0:
        raise DataError(f"--data-path weights must be non-negative with a positive sum, got {weights}")
    return items[1::2], [w / total for w in weights]


def get_split_ranges(split: str, num_docs: int) -> list[tuple[int, int]]:
    parts = [float(s) for s in split.replace("/", ",").split(",")]
    parts = (parts + [0.0, 0.0])[:3]
    total = sum(parts)
    parts = [p / total for p in parts]
    index = [0]
    for p in parts:
        index.append(index[-1] + int(round(p * float(num_docs))))
    diff = index[-1] - num_docs
    index = [index[0]] + [i - diff for i in index[1:]]
    return [(index[i], index[i + 1]) for i in range(3)]


def _save_atomic(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, path)


class GPTDataset(Dataset):
    def __init__(self, name: str, prefix: str, indexed: MMapIndexedDataset, documents: np.ndarray,
                 num_samples: int, seq_length: int, seed: int, *, cache: bool = True, is_builder: bool = True,
                 barrier: Optional[Callable[[], None]] = None):
        self.name, self.indexed, self.seq = name, indexed, seq_length
        sizes = indexed.sizes[documents].astype(np.int64)
        tokens_per_epoch = int(sizes.sum())
        if len(documents) == 0 or tokens_per_epoch < seq_length + 1:
            raise DataError(f"{prefix}: the {name} split has {len(documents)} documents and {tokens_per_epoch} "
                            f"tokens: data too small for seq length {seq_length}")
        # The cache is valid only for these documents of this corpus: a new --split or a re-tokenized prefix
        # gets new files instead of silently reusing old sample indices.
        what = f"{int(documents[0])}:{int(documents[-1])}:{len(documents)}:{tokens_per_epoch}:{len(indexed)}"
        digest = hashlib.md5(what.encode()).hexdigest()[:10]
        stem = f"{prefix}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s_{digest}"
        paths = {k: f"{stem}_{k}_idx.npy" for k in ("doc", "sample", "shuffle")}
        self.cache_paths = paths
        arrays = None
        if is_builder and not (cache and all(os.path.exists(p) for p in paths.values())):
            arrays = self._build(documents, sizes, tokens_per_epoch, num_samples, seq_length, seed)
            if cache:
                for k, arr in arrays.items():
                    _save_atomic(paths[k], arr)
        if barrier:   # builder and readers call it exactly once each
            barrier()
        if arrays is None:
            arrays = {k: np.load(p, mmap_mode="r") for k, p in paths.items()} if cache else \
                self._build(documents, sizes, tokens_per_epoch, num_samples, seq_length, seed)
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays["doc"], arrays["sample"], arrays["shuffle"]

    @staticmethod
    def _build(documents, sizes, tokens_per_epoch, num_samples, seq_length, seed) -> dict:
        epochs = max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))
        rng = np.random.RandomState(seed)
        doc_idx = np.tile(np.asarray(documents, dtype=np.int64), epochs)
        rng.shuffle(doc_idx)
        first = int(np.asarray(documents)[0])   # documents of a split are a contiguous range
        lengths = sizes[doc_idx - first]
        cum = np.concatenate([[0], np.cumsum(lengths)])
        pos = np.arange(num_samples + 1, dtype=np.int64) * seq_length   # sample k starts at token k*seq
        doc_i = np.searchsorted(cum, pos, side="right") - 1
        sample_idx = np.stack([doc_i, pos - cum[doc_i]], axis=1).astype(np.int64)
        shuffle_idx = rng.permutation(num_samples).astype(np.int64)
        return {"doc": doc_idx, "sample": sample_idx, "shuffle": shuffle_idx}

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, i: int) -> dict:
        i = int(self.shuffle_idx[i])
        (d0, o0), (d1, o1) = self.sample_idx[i], self.sample_idx[i + 1]
        if d0 == d1:
            tokens = self.indexed.get(int(self.doc_idx[d0]), offset=int(o0), length=int(o1 - o0 + 1))
        else:
            parts = [self.indexed.get(int(self.doc_idx[d0]), offset=int(o0))]
            parts += [self.indexed.get(int(self.doc_idx[d])) for d in range(d0 + 1, d1)]
            parts.append(self.indexed.get(int(self.doc_idx[d1]), length=int(o1) + 1))
            tokens = np.concatenate(parts)
        return {"text": tokens.astype(np.int64)}


def build_train_valid_test_datasets(data_path, split: str, num_samples: tuple, seq_length: int, seed: int, *,
                                    is_builder: bool = True, barrier: Optional[Callable[[], None]] = None):
    prefixes, weights = parse_data_path(data_path)
    names = ("train", "valid", "test")

    def single(prefix: str, counts: tuple) -> list:
        indexed = MMapIndexedDataset(prefix)
        ranges = get_split_ranges(split, len(indexed))
        out = []
        for name, (lo, hi), n in zip(names, ranges, counts):
            if n <= 0 or hi <= lo:
                out.append(None)
                continue
            out.append(GPTDataset(name, prefix, indexed, np.arange(lo, hi, dtype=np.int64), n, seq_length, seed,
                                  is_builder=is_builder, barrier=barrier))
        return out

    if len(prefixes) == 1:
        return tuple(single(prefixes[0], num_samples))
    per = [single(p, tuple(int(math.ceil(n * w * 1.005)) for n in num_samples)) for p, w in zip(prefixes, weights)]
    result = []
    for k, n in enumerate(num_samples):
        parts = [(ds[k], w) for ds, w in zip(per, weights) if ds[k] is not None]
        result.append(BlendableDataset([d for d, _ in parts], [w for _, w in parts], n) if parts and n > 0
                      else None)
    return tuple(result)
