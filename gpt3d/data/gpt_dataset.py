"""The GPT dataset: which tokens form training sample k, identical to Megatron-DeepSpeed's.

A run moved from Megatron-DeepSpeed must see the same batches, so the three
index arrays follow its rules exactly (same values and dtypes for the same data
prefix, split, seed, sequence length and sample count):

* doc_idx: the split's documents repeated for as many epochs as the requested
  samples need, shuffled by np.random.RandomState(seed). When the last epoch
  would contribute fewer than 80% of an epoch's samples it is shuffled on its
  own after the other epochs ("separate last epoch"), so its few documents are
  not spread over the whole run.
* sample_idx: sample k spans seq+1 tokens of the doc_idx stream starting at
  token k*seq (consecutive samples share one token); row k is (position in
  doc_idx, offset in that document) of its first token. Computed with one cumsum
  and one np.repeat instead of a per-sample loop.
* shuffle_idx: every sample of the epochs built (not only those requested) is
  shuffled, the separated last epoch's samples on their own after the rest.

The arrays are cached as .npy beside the data, built by one rank while the
others wait; the file name carries a digest of the split's documents and of the
rule version, so a new --split or an older rule never reuses stale indices.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional
from collections.abc import Callable

import numpy as np
from torch.utils.data import Dataset

from ..console.progress import Activity
from .blend import BlendableDataset, corpus_num_samples, normalize_weights, save_atomic
from .indexed import MMapIndexedDataset
from ..errors import DataError
from ..tokenizers.vocab_check import check_token_ids

RULES = "mds1"   # bump when the index rules change, so old caches are not reused


def data_path_items(data_path) -> list[str]:
    """--data-path as Megatron's argparse list (nargs='*'): `1.0 prefix` is two items."""
    return data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]


def parse_data_path(data_path) -> tuple[list[str], list[float]]:
    """`prefix` or `w1 p1 w2 p2 ...` -> (prefixes, weights normalised as Megatron does)."""
    items = data_path_items(data_path)
    if len(items) == 1:
        return items, [1.0]
    if len(items) % 2:
        raise DataError(f"--data-path with weights needs pairs 'weight prefix', got {items}")
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        raise DataError(f"--data-path: expected 'weight prefix' pairs, got {items}") from None
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"--data-path weights must be finite, non-negative numbers with a positive sum, got "
                        f"{items[0::2]}")
    return [p.strip() for p in items[1::2]], normalize_weights(weights)


def get_split_ranges(split: str, num_docs: int) -> list[tuple[int, int]]:
    """Megatron's document split: rounded fractions, the rounding error taken off every boundary."""
    sep = "," if "," in split else "/"
    parts = [float(s) for s in split.split(sep)]
    parts = (parts + [0.0, 0.0])[:3]
    total = sum(parts)
    parts = [p / total for p in parts]
    index = [0]
    for p in parts:
        index.append(index[-1] + int(round(p * float(num_docs))))
    diff = index[-1] - num_docs
    index = [index[0]] + [i - diff for i in index[1:]]
    return [(index[i], index[i + 1]) for i in range(3)]


# ----- the three index rules ---------------------------------------------------------------------------------
def num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens give num_samples samples of seq+1 tokens overlapping by one."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def separate_last_epoch(tokens_per_epoch: int, seq_length: int, num_samples: int, epochs: int) -> tuple[bool, int]:
    """(shuffle the last epoch apart?, samples in the epochs before it).

    Megatron asserts last <= per_epoch; the carried-over token can make it per_epoch + 1 (e.g. 1133
    tokens, seq 16, 141 samples), where Megatron stops with an AssertionError. gpt3d goes on: such an
    epoch is full, so it is not separated."""
    if epochs == 1:
        return False, 0
    before = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
    last = num_samples - before
    per_epoch = (tokens_per_epoch - 1) // seq_length
    return last < int(0.80 * per_epoch), before


def build_doc_idx(documents: np.ndarray, epochs: int, rng: np.random.RandomState, separate: bool) -> np.ndarray:
    docs = np.asarray(documents, dtype=np.int32)
    if not separate or epochs == 1:
        doc_idx = np.tile(docs, epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(docs, epochs - 1, rng, False)
    last = build_doc_idx(docs, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, tokens: int) -> np.ndarray:
    """[(doc_idx position, offset) of sample k's first token] for k = 0..N, N = (tokens - 1) // seq.

    Sample k ends at stream token e = k*seq (its last token is the next sample's first). That token
    lies in the document j with cum[j] <= e < cum[j+1], so document j holds the ends of samples
    ceil(cum[j]/seq) .. ceil(cum[j+1]/seq) - 1: a np.repeat of the documents by those counts. Empty
    documents hold none, as the sequential rule skips them; only row 0 is (0, 0) unconditionally."""
    n = (tokens - 1) // seq_length
    cum = np.empty(len(doc_idx) + 1, dtype=np.int64)
    cum[0] = 0
    np.cumsum(sizes[doc_idx], dtype=np.int64, out=cum[1:])
    assert cum[-1] == tokens, (int(cum[-1]), tokens)
    first = np.negative(cum)                 # ceil(cum / seq), in place: the arrays are large
    np.floor_divide(first, seq_length, out=first)
    np.negative(first, out=first)
    counts = np.diff(first)
    del first
    wide = len(doc_idx) >= 2 ** 31 or int(sizes.max(initial=0)) >= 2 ** 31
    dtype = np.int64 if wide else np.int32
    which = np.repeat(np.arange(len(doc_idx), dtype=dtype), counts)
    del counts
    assert len(which) == n + 1, (len(which), n + 1)
    sample_idx = np.empty((n + 1, 2), dtype=dtype)
    sample_idx[:, 0] = which
    offsets = np.arange(n + 1, dtype=np.int64)
    offsets *= seq_length
    offsets -= cum[which]
    sample_idx[:, 1] = offsets
    sample_idx[0] = (0, 0)
    return sample_idx


def build_shuffle_idx(first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """Shuffle [0, first) and, after it, [first, total) on its own."""
    dtype = np.int64 if total >= np.iinfo(np.uint32).max - 1 else np.uint32
    head = np.arange(first, dtype=dtype)
    rng.shuffle(head)
    if first == total:
        return head
    tail = np.arange(first, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate((head, tail))


def build_index_mappings(documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int,
                         seed: int) -> dict:
    """doc_idx, sample_idx and shuffle_idx of one split, in Megatron-DeepSpeed's order and dtypes."""
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    epochs = num_epochs(tokens_per_epoch, seq_length, num_samples)
    separate, before = separate_last_epoch(tokens_per_epoch, seq_length, num_samples, epochs)
    rng = np.random.RandomState(seed=seed)
    doc_idx = build_doc_idx(documents, epochs, rng, separate)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, epochs * tokens_per_epoch)
    total = sample_idx.shape[0] - 1
    shuffle_idx = build_shuffle_idx(before if separate else total, total, rng)
    return {"doc": doc_idx, "sample": sample_idx, "shuffle": shuffle_idx}


class GPTDataset(Dataset):
    """Sample i is the shuffle_idx[i]-th run of seq+1 tokens; its length counts every sample of the epochs
    built, as Megatron's does (the trainer reads only as many as it asked for)."""

    def __init__(self, name: str, prefix: str, indexed: MMapIndexedDataset, documents: np.ndarray,
                 num_samples: int, seq_length: int, seed: int, *, cache: bool = True, is_builder: bool = True,
                 barrier: Optional[Callable[[], None]] = None):
        self.name, self.indexed, self.seq, self.prefix = name, indexed, seq_length, prefix
        documents = np.asarray(documents, dtype=np.int32)
        tokens_per_epoch = int(np.sum(indexed.sizes[documents], dtype=np.int64))
        self.documents, self.tokens = len(documents), tokens_per_epoch   # this split's (the start-up line)
        if len(documents) == 0 or tokens_per_epoch < seq_length + 1:
            raise DataError(f"{prefix}: the {name} split has {len(documents)} documents and {tokens_per_epoch} "
                            f"tokens: data too small for seq length {seq_length}")
        epochs = num_epochs(tokens_per_epoch, seq_length, num_samples)
        separate = separate_last_epoch(tokens_per_epoch, seq_length, num_samples, epochs)[0]
        # what, besides the settings, decides the sample order (a resume compares it, see stream.py)
        self.order = f"{epochs} epoch{'s' * (epochs > 1)}" + (", the last shuffled apart" if separate else "")
        what = f"{RULES}:{int(documents[0])}:{int(documents[-1])}:{len(documents)}:{tokens_per_epoch}:{len(indexed)}"
        self.digest = hashlib.md5(what.encode()).hexdigest()[:10]
        stem = f"{prefix}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s_{self.digest}"
        paths = {k: f"{stem}_{k}_idx.npy" for k in ("doc", "sample", "shuffle")}
        self.cache_paths = paths
        shapes = {"doc": (epochs * len(documents),), "sample": ((epochs * tokens_per_epoch - 1) // seq_length + 1, 2),
                  "shuffle": ((epochs * tokens_per_epoch - 1) // seq_length,)}
        arrays = cached_mappings(paths, shapes, documents, indexed.sizes) if cache and is_builder else None
        if is_builder and arrays is None:   # none cached yet, or a cache that does not fit: (re)built
            with Activity(f"building the {name} sample index of {prefix} ({num_samples:,} samples, {self.order})"):
                arrays = build_index_mappings(documents, indexed.sizes, num_samples, seq_length, seed)
            if cache:
                for k, arr in arrays.items():
                    save_atomic(paths[k], arr)
        if barrier:   # builder and readers call it exactly once each
            barrier()
        if arrays is None and cache:
            arrays = cached_mappings(paths, shapes, documents, indexed.sizes)
            if arrays is None:
                raise DataError(f"{paths['sample']}: the cached sample index does not fit this data (corrupt, or "
                                "changed while the builder rank wrote it): remove the *_idx.npy files and rerun")
        elif arrays is None:
            arrays = build_index_mappings(documents, indexed.sizes, num_samples, seq_length, seed)
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays["doc"], arrays["sample"], arrays["shuffle"]

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

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
        if len(tokens) != self.seq + 1:   # only a damaged cache of the sample index gets here
            raise DataError(f"{self.cache_paths['sample']}: sample {i} spans {len(tokens)} tokens, not seq + 1 = "
                            f"{self.seq + 1}: the cached sample index is corrupt; remove the *_idx.npy files and "
                            "rerun")
        return {"text": tokens.astype(np.int64)}


def cached_mappings(paths: dict, shapes: dict, documents: np.ndarray, sizes: np.ndarray) -> Optional[dict]:
    """The cached doc/sample/shuffle arrays (memory-mapped) if every file loads, has the shape this split's
    settings give and only values in range (documents of the split, positions in doc_idx in order, offsets
    inside their document, samples), else None: a cache beside the data is checked like the data, never
    trusted to index it. (What stays in range yet is not this order reads as another order of whole samples;
    a sample of the wrong length is refused when read.)"""
    try:
        arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
    except Exception:  # noqa: BLE001 - a damaged .npy header raises ValueError, SyntaxError, ...
        return None
    doc, sample, shuffle = arrays["doc"], arrays["sample"], arrays["shuffle"]
    if any(arrays[k].shape != shapes[k] or arrays[k].dtype.kind not in "iu" for k in arrays):
        return None
    lo, hi = int(documents[0]), int(documents[-1])
    for a in range(0, len(doc), _CHECK_BLOCK):
        d = doc[a:a + _CHECK_BLOCK]
        if int(d.min()) < lo or int(d.max()) > hi:
            return None
    for a in range(0, len(sample), _CHECK_BLOCK):
        rows = sample[max(a - 1, 0):a + _CHECK_BLOCK]
        if int(rows[:, 0].min()) < 0 or int(rows[:, 0].max()) >= len(doc) or int(rows[:, 1].min()) < 0 \
                or (np.diff(rows[:, 0].astype(np.int64)) < 0).any() \
                or (rows[:, 1] > sizes[doc[rows[:, 0]]]).any():
            return None
    for a in range(0, len(shuffle), _CHECK_BLOCK):
        if int(shuffle[a:a + _CHECK_BLOCK].max()) >= len(shuffle):
            return None
    return arrays


_CHECK_BLOCK = 1 << 24


def build_train_valid_test_datasets(data_path, split: str, num_samples: tuple, seq_length: int, seed: int, *,
                                    is_builder: bool = True, barrier: Optional[Callable[[], None]] = None,
                                    vocab_size: Optional[int] = None):
    """(train, valid, test) for `num_samples` = (train, valid, test) sample counts (see sizing.py).

    As in Megatron-DeepSpeed, the branch is taken on the raw --data-path list: one item is one corpus
    indexed for N samples; anything longer is `weight prefix` pairs, even a single pair (`1.0 prefix`):
    each corpus is asked for ceil(N * w * 1.005) samples and the blend, built by Megatron's greedy
    (blend.py), has the sum of those counts as its length (its first N samples are what training reads).
    With `vocab_size`, every id of the documents used must fit it (tokenizers/vocab_check.py)."""
    prefixes, weights = parse_data_path(data_path)
    names = ("train", "valid", "test")

    def single(prefix: str, counts) -> list:
        indexed = MMapIndexedDataset(prefix)
        if len(indexed) == 0:
            raise DataError(f"{prefix}: the corpus holds no documents (an empty .bin/.idx)")
        ranges = get_split_ranges(split, len(indexed))
        if counts[0] > 0 and ranges[0][1] <= ranges[0][0]:
            raise DataError(f"{prefix}: --split {split} leaves no training documents (of {len(indexed)}); "
                            "give the train split a share")
        if vocab_size is not None:
            used = [r for r, n in zip(ranges, counts) if n > 0 and r[1] > r[0]]
            if used:
                check_token_ids(indexed, min(r[0] for r in used), max(r[1] for r in used), vocab_size,
                                is_builder=is_builder, barrier=barrier)
        out = []
        for name, (lo, hi), n in zip(names, ranges, counts):
            if n <= 0 or hi <= lo:
                out.append(None)
                continue
            out.append(GPTDataset(name, prefix, indexed, np.arange(lo, hi, dtype=np.int32), n, seq_length, seed,
                                  is_builder=is_builder, barrier=barrier))
        return out

    if len(data_path_items(data_path)) == 1:
        return tuple(single(prefixes[0], num_samples))
    per_corpus = corpus_num_samples(weights, num_samples)
    per = [single(p, counts) for p, counts in zip(prefixes, per_corpus)]
    result = []
    for k, n in enumerate(num_samples):
        parts = [(ds[k], w) for ds, w in zip(per, weights) if ds[k] is not None]
        if not parts or n <= 0:
            result.append(None)
            continue
        n = sum(counts[k] for counts in per_corpus)   # Megatron-DeepSpeed's blend size, over every corpus
        key = f"{names[k]}:{n}:" + "|".join(f"{d.cache_paths['shuffle']}:{w!r}" for d, w in parts)
        cache = f"{prefixes[0]}_{names[k]}_blend_{n}ns_{hashlib.md5(key.encode()).hexdigest()[:10]}"
        result.append(BlendableDataset([d for d, _ in parts], [w for _, w in parts], n, cache_prefix=cache,
                                       is_builder=is_builder, barrier=barrier))
    return tuple(result)
