"""Checkpoints that survive crashes and load at any TP/PP/DP layout.

Layout of SAVE/:
    latest                        name of the newest complete checkpoint, written last
    .lock                         flock held by the run saving here (pid, host, start time inside)
    iter_0000100/
      meta.json                   iteration, data position, layout, config, scaler, parameter shapes,
                                  each file's size and checksum, a checksum of meta.json's own content
      model_tp{t}_pp{p}.safetensors          this (tp, pp) shard of every parameter, by global name
      optim_tp{t}_pp{p}_dp{d}.safetensors    fp32 master + Adam moments, in parameter space
      rng_rank{r}.safetensors                this rank's random streams (older checkpoints: rng_rank{r}.pt)
      tokenizer/                             a copy of the run's tokenizer files (meta.json "tokenizer")
    .iter_0000200.tmp-HOST-PID-RANDOM/       a save in progress (or killed: the next save removes it)

What is saved is a set of stateful parts (parts.py: model chunks, optimizer, loss scaler, RNG, train
state; tokenizer_part.py: the tokenizer); the directory, its crash-safe save sequence and every file write
live in store.py; reading the shards back at another layout in reshard.py. Only a good checkpoint is loaded
(integrity.py): meta.json records each file's size and xxh3-128 checksum (and one of itself), and a file
with non-finite tensors marks it bad. Nothing is unpickled, and only the files meta.json lists are opened
(meta_check.py checks meta.json itself first).
"""
from .integrity import structure_problem
from .lock import lock_save_dir
from .parts import skipped_parts, training_parts, weights_parts
from .full_model import read_model_tensors
from .store import Loaded, describe, holds_no_checkpoint, list_checkpoints, load, read_meta, resolve, save


def save_weights(root: str, tensors: dict, params: dict, config: dict, vocab_size: int, padded_vocab: int,
                 tokenizer=None) -> str:
    """A weights-only checkpoint at layout 1x1x1, iteration 0 (import-hf), written as atomically as a training one.

    `tensors` are the full parameters of a TP=1 model by name; `params` their shape/split metadata;
    `tokenizer` (optional) is carried like a training run's."""
    from ..parallel.state import ParallelState
    parts = weights_parts(tensors, params, config, vocab_size, padded_vocab, tokenizer)
    return save(root, parts, ParallelState.single(), 0)


__all__ = ["save", "load", "Loaded", "training_parts", "skipped_parts", "save_weights", "read_model_tensors",
           "resolve", "holds_no_checkpoint", "read_meta", "describe", "list_checkpoints",
           "structure_problem", "lock_save_dir"]
