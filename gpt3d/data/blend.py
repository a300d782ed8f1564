"""Weighted mixture of corpora, sample for sample the one Megatron-DeepSpeed builds.

Sample i of the blend goes to the corpus whose share lags its weight the most:
argmax_d(w_d * max(i, 1) - count_d), computed in float64, the first corpus
winning ties (helpers.cpp's build_blending_indices). Every prefix of the blend
then honours the weights as closely as integers allow, whatever the layout.
The greedy is sequential (each choice depends on all earlier ones), so it runs
as a tight Python loop (0.3-0.5 us a sample) and its result is cached on disk,
keyed by the corpora's own index caches, the weights and the size.
"""
from __future__ import annotations

import math
from typing import Optional
from collections.abc import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from ..files import atomic
from ..console.progress import Activity
from ..errors import DataError


def save_atomic(path: str, arr: np.ndarray) -> None:
    """np.save through a temporary name (atomic.replacing), so a reader never sees half an index."""
    with atomic.replacing(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """w / sum(w) with the sum accumulated left to right (Python's sum() compensates since 3.12, and a
    last-bit difference in a weight can move a ceil() or a greedy tie)."""
    total = 0.0
    for w in weights:
        total += float(w)
    return [float(w) / total for w in weights]


def corpus_num_samples(weights: Sequence[float], num_samples: Sequence[int]) -> list[tuple[int, ...]]:
    """Samples asked of each corpus: ceil(N * w * 1.005) per split, the 0.5% leaving room for the greedy."""
    return [tuple(int(math.ceil(n * w * 1.005)) for n in num_samples) for w in weights]


def blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(corpus of sample i as uint8, its index within that corpus as int64)."""
    w = [float(x) for x in weights]
    k = len(w)
    if k > 255:
        raise DataError(f"a blend takes at most 255 corpora, got {k}")
    chosen = bytearray(size)
    if k == 2:
        w0, w1 = w
        c0 = c1 = 0
        for i in range(size):
            t = i if i > 1 else 1          # an int: float * int converts it exactly, like static_cast<double>
            if w1 * t - c1 > w0 * t - c0:
                chosen[i] = 1
                c1 += 1
            else:
                c0 += 1
    elif k == 3:                           # the common 3-corpus blend, unrolled: ~0.3 us a sample
        w0, w1, w2 = w
        c0 = c1 = c2 = 0
        for i in range(size):
            t = i if i > 1 else 1
            e0, e1, e2 = w0 * t - c0, w1 * t - c1, w2 * t - c2
            if e1 > e0:
                if e2 > e1:
                    chosen[i] = 2
                    c2 += 1
                else:
                    chosen[i] = 1
                    c1 += 1
            elif e2 > e0:
                chosen[i] = 2
                c2 += 1
            else:
                c0 += 1
    elif k > 3:
        counts = [0] * k
        others = range(1, k)
        for i in range(size):
            t = i if i > 1 else 1
            best, lag = 0, w[0] * t - counts[0]
            for d in others:               # strictly greater: the first of equal lags wins
                v = w[d] * t - counts[d]
                if v > lag:
                    best, lag = d, v
            chosen[i] = best
            counts[best] += 1
    dataset_index = np.frombuffer(chosen, dtype=np.uint8).copy()
    sample_index = np.empty(size, dtype=np.int64)
    for d in range(k):
        mine = dataset_index == d
        sample_index[mine] = np.arange(int(np.count_nonzero(mine)), dtype=np.int64)
    return dataset_index, sample_index


class BlendableDataset(Dataset):
    """`size` samples drawn from `datasets` by the greedy; weights are renormalised in float64 as Megatron's
    BlendableDataset does. With `cache_prefix` the indices are built by the builder rank and loaded by all."""

    def __init__(self, datasets: list, weights: list, size: int, *, cache_prefix: Optional[str] = None,
                 is_builder: bool = True, barrier: Optional[Callable[[], None]] = None):
        w = np.array(weights, dtype=np.float64)
        w /= np.sum(w)
        self.datasets, self.weights, self.size = datasets, w, size
        # the greedy's choices do not depend on `size`; each corpus' index does (see stream.py)
        self.order = " + ".join(str(getattr(d, "order", None)) for d in datasets)
        if cache_prefix is None:
            self.dataset_index, self.sample_index = blending_indices(w, size)
            return
        paths = (f"{cache_prefix}_index.npy", f"{cache_prefix}_sample_index.npy")
        self.cache_paths = paths
        if is_builder and self._cached(paths) is None:   # none cached yet, or one that does not fit: rebuilt
            with Activity(f"building the blend index ({size:,} samples from {len(datasets)} corpora)"):
                arrays = blending_indices(w, size)
            for p, arr in zip(paths, arrays):
                save_atomic(p, arr)
        if barrier:
            barrier()
        cached = self._cached(paths)
        if cached is None:
            raise DataError(f"{paths[0]}: the cached blend does not fit these corpora (corrupt, or changed while "
                            "the builder rank wrote it): remove it and its _sample_index.npy and rerun")
        self.dataset_index, self.sample_index = cached

    def _cached(self, paths: tuple) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The cached (dataset_index, sample_index), memory-mapped, if both load with this blend's size and
        only indices into its corpora; else None (a cache beside the data is checked like the data)."""
        try:
            index, sample = (np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
        except Exception:  # noqa: BLE001 - a damaged .npy header raises ValueError, SyntaxError, ...
            return None
        if index.shape != (self.size,) or sample.shape != (self.size,) or index.dtype != np.uint8 or \
                sample.dtype.kind not in "iu":
            return None
        lens = np.array([len(d) for d in self.datasets] + [0], dtype=np.int64)   # [k]: an index beyond them
        for a in range(0, self.size, 1 << 24):
            i, s = np.minimum(index[a:a + (1 << 24)], len(self.datasets)), sample[a:a + (1 << 24)]
            if len(s) and (int(s.min()) < 0 or (s >= lens[i]).any()):
                return None
        return index, sample

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]
