"""A checkpoint's whole model, for export and inference: every parameter as a full tensor, whatever layout
saved it (read through reshard.py's ShardReader), checked against the model its config describes.

Kept apart from reshard.py (which store.py uses to load a run) because it finds the checkpoint through store.py.
"""
from __future__ import annotations

import torch

from ..console.progress import Progress
from ..errors import CheckpointError
from ..model.gpt import VOCAB_PARAMETERS
from .integrity import files_read_for_inference, non_finite
from .meta_check import saved_model_config
from .reshard import ShardReader
from .store import read_meta, resolve


def read_model_tensors(root: str) -> tuple[str, dict, dict]:
    """(path, meta, {name: full tensor}) of a checkpoint at any saved layout, for export and inference.

    Every parameter of the model its config describes, with that model's shape (padded vocabulary rows cut
    off; a tied output layer is the embedding): a shard whose tensors do not fit the config is refused. The
    model shards' checksums are verified first and every tensor must be finite: a bad checkpoint is refused."""
    from ..model.build import build_full_model
    path = resolve(root, fallback=False, wanted=files_read_for_inference)   # a bad newest checkpoint is refused
    meta = read_meta(path)
    vocab = meta["vocab_size"]
    model = build_full_model(saved_model_config(meta["config"]), vocab, device=torch.device("meta"))
    reader = ShardReader(path, meta)
    tensors = {}
    params = list(model.named_parameters())
    with Progress(f"reading {path}", len(params), "tensors") as bar:
        for name, p in params:
            bar.update()
            full = reader.model_tensor(name)
            if full is None:
                raise CheckpointError(f"checkpoint {path} has no tensor for parameter {name}")
            want = (vocab, *p.shape[1:]) if name in VOCAB_PARAMETERS else tuple(p.shape)
            tensors[name] = full[:vocab] if name in VOCAB_PARAMETERS else full
            if tuple(tensors[name].shape) != want:
                raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(full.shape)}, its config's "
                                      f"model needs {want}")
            if non_finite({name: tensors[name]}):
                raise CheckpointError(f"checkpoint {path}: {name} holds non-finite values; refusing to use it")
    return path, meta, tensors
