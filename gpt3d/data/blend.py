"""Weighted mixture of datasets, deterministic (Megatron's greedy blending).

Sample i goes to the dataset whose share so far lags its weight the most, so
every prefix of the blend honours the weights as closely as integers allow,
independent of how many ranks read it.
"""
from __future__ import annotations

from array import array

import numpy as np
from torch.utils.data import Dataset


def blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of sample i, its index within that dataset). Plain Python floats and a flat int16 array:
    the greedy is sequential, and this runs ~0.3 us a sample (about 45 s for 146M samples), 10x numpy's."""
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    others = range(1, len(w))
    chosen = array("h", bytes(2 * size))
    for i in range(size):
        t = i + 1
        best, lag = 0, w[0] * t - counts[0]
        for d in others:                      # the first of equal lags wins, as np.argmax
            v = w[d] * t - counts[d]
            if v > lag:
                best, lag = d, v
        chosen[i] = best
        counts[best] += 1
    dataset_index = np.frombuffer(chosen, dtype=np.int16).copy()
    sample_index = np.empty(size, dtype=np.int64)
    for d in range(len(w)):
        mine = dataset_index == d
        sample_index[mine] = np.arange(int(mine.sum()))
    return dataset_index, sample_index


class BlendableDataset(Dataset):
    def __init__(self, datasets: list, weights: list, size: int):
        w = np.asarray(weights, dtype=np.float64)
        self.datasets, self.weights, self.size = datasets, w / w.sum(), size
        self.dataset_index, self.sample_index = blending_indices(self.weights, size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.datasets[self.dataset_index[i]][int(self.sample_index[i])]
