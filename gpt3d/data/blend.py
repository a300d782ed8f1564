"""Weighted mixture of datasets, deterministic (Megatron's greedy blending).

Sample i goes to the dataset whose share so far lags its weight the most, so
every prefix of the blend honours the weights as closely as integers allow,
independent of how many ranks read it.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


def blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    counts = np.zeros(len(weights), dtype=np.int64)
    for i in range(size):
        d = int(np.argmax(weights * (i + 1) - counts))
        dataset_index[i], sample_index[i] = d, counts[d]
        counts[d] += 1
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
