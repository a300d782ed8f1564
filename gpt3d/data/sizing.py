"""How many iterations a run has and how many samples each split's index is built for.

The sample order depends on these counts (they fix the number of epochs, hence
the shuffles), so they are computed exactly as Megatron-DeepSpeed's training.py
does: --train-samples gives samples // global batch iterations (--train-tokens
may stop the loop earlier without changing the index); validation is sized for
one window of --eval-iters batches per evaluation plus one, test for one window.
"""
from __future__ import annotations

import math
from typing import Optional


def train_iterations(train_iters: Optional[int], train_samples: Optional[int], train_tokens: Optional[int],
                     global_batch: int, seq_length: int) -> int:
    """--train-iters, else --train-samples // global batch, else enough iterations for --train-tokens."""
    if train_iters is not None:
        return train_iters
    if train_samples:
        return train_samples // global_batch
    return math.ceil(train_tokens / (global_batch * seq_length))


def train_valid_test_num_samples(train_iters: int, train_samples: Optional[int], global_batch: int,
                                 eval_interval: int, eval_iters: int) -> tuple[int, int, int]:
    """(train, valid, test) samples to index, as Megatron-DeepSpeed's build_train_valid_test_datasets asks."""
    train = train_samples if train_samples else train_iters * global_batch
    evaluations = train_iters // eval_interval + 1
    return train, evaluations * eval_iters * global_batch, eval_iters * global_batch
