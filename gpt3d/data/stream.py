"""What decides the stream of training samples a run sees, so a resume can tell whether it would change.

A resumed run continues at `consumed_samples` of its sample order. That position means the same data only
if the order is the same: same corpora (--data-path, with weights), --split, --seq-length, --seed, the
same global batch (what one step consumes), and an index built over the same number of epochs (a longer
--train-iters can need another epoch, which reshuffles everything; see gpt_dataset.py). `data_state`
records these in the checkpoint; `changes` names the ones that differ. The tokenizer is checked apart
(checkpoint/tokenizer_part.py), and never overridden: with another one every embedding row means another
token.
"""
from __future__ import annotations

import os
from typing import Optional

from ..config import Config

# setting in the data state -> how a message names it
LABELS = {"mock_data": "--mock-data", "data_path": "--data-path", "split": "--split", "seq_length": "--seq-length",
          "global_batch_size": "--global-batch-size", "seed": "--seed",
          "sample_order": "the sample order (the index the train samples need, from --train-iters/--train-samples)"}


def _path_item(x: str) -> str:
    try:
        float(x)
        return x            # a blend weight
    except ValueError:
        return os.path.abspath(x)


def data_state(cfg: Config, global_batch: Optional[int], train_dataset=None) -> dict:
    """The data stream's settings; with the train dataset also its sample order (the epochs of its index)."""
    d = cfg.data
    state = {"mock_data": d.mock_data, "data_path": None if d.mock_data else [_path_item(x) for x in d.data_path],
             "split": None if d.mock_data else d.split, "seq_length": cfg.model.seq_length,
             "global_batch_size": global_batch, "seed": cfg.training.seed}
    if train_dataset is not None:
        state["sample_order"] = getattr(train_dataset, "order", None)
    return state


def describe(cfg: Config, train_dataset) -> str:
    """What the run trains on, for its start-up line: 'mock (...)', or each corpus' path, weight and the tokens
    and documents of its train split."""
    d = cfg.data
    if d.mock_data:
        unused = f"; --data-path {' '.join(d.data_path)} is not read" if d.data_path else ""
        return f"mock (synthetic tokens, --mock-data{unused})"
    parts = getattr(train_dataset, "datasets", None)
    if parts is None:
        return f"{_corpus(train_dataset)}, --split {d.split}"
    weights = getattr(train_dataset, "weights", [])
    listed = ", ".join(f"{w:.1%} {_corpus(ds)}" for ds, w in zip(parts, weights))
    return f"blend of {len(parts)}: {listed}, --split {d.split}"


def _corpus(ds) -> str:
    return f"{ds.prefix} ({ds.tokens:,} tokens in {ds.documents:,} documents of the train split)"


def changes(saved: dict, current: dict) -> list[str]:
    """'--seq-length 64 -> 32', ... for every setting recorded on both sides that differs."""
    out = []
    for key, label in LABELS.items():
        if key in saved and key in current and saved[key] != current[key]:
            old, new = saved[key], current[key]
            if key == "data_path":
                out.append(f"{label} {' '.join(old or ['(mock)'])} -> {' '.join(new or ['(mock)'])}")
            else:
                out.append(f"{label} {old} -> {new}")
    return out
