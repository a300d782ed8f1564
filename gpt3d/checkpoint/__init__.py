"""Checkpoints that survive crashes and load at any TP/PP/DP layout.

Layout of SAVE/:
    latest                        name of the newest complete checkpoint, written last
    iter_0000100/
      meta.json                   iteration, data position, layout, config, scaler, parameter shapes,
                                  each file's size
      model_tp{t}_pp{p}.safetensors          this (tp, pp) shard of every parameter, by global name
      optim_tp{t}_pp{p}_dp{d}.safetensors    fp32 master + Adam moments, in parameter space
      rng_rank{r}.pt

What is saved is a set of stateful parts (parts.py: model chunks, optimizer, loss scaler, RNG, train
state); the directory, its crash-safe save sequence and every file write live in store.py; reading the
shards back at another layout in reshard.py. A directory without a valid meta.json (or whose files do not
have the recorded sizes) is never loaded.
"""
from ..errors import CheckpointError
from .parts import skipped_parts, training_parts, weights_parts
from .reshard import read_model_tensors
from .store import Loaded, describe, holds_no_checkpoint, list_checkpoints, load, read_meta, resolve, save


def save_weights(root: str, tensors: dict, params: dict, config: dict, vocab_size: int, padded_vocab: int) -> str:
    """A weights-only checkpoint at layout 1x1x1, iteration 0 (import-hf), written as atomically as a training one.

    `tensors` are the full parameters of a TP=1 model by name; `params` their shape/split metadata."""
    from ..parallel.state import ParallelState
    return save(root, weights_parts(tensors, params, config, vocab_size, padded_vocab), ParallelState.single(), 0)


__all__ = ["save", "load", "Loaded", "training_parts", "skipped_parts", "save_weights", "read_model_tensors",
           "resolve", "holds_no_checkpoint", "read_meta", "describe", "list_checkpoints", "CheckpointError"]
