"""Reading saved shards back at any layout: full tensors from the shards of the saved TP layout, then this
rank's slice of the current one (vocabulary rows trimmed or padded to this layout's padding).

Model shards are stored per (tp, pp) by global parameter name; optimizer state per (tp, pp, dp) as element
ranges of the flattened TP-local parameter (`name::kind::lo::hi`). A tensor is never needed whole on more
than one rank at a time, and only one parameter is assembled at once.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections import defaultdict
from typing import Optional

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model.gpt import EMBEDDING, OUTPUT_LAYER

# Model settings that change parameter shapes or names: a checkpoint loads only where they agree.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "ffn_hidden_size",
              "swiglu", "normalization", "disable_bias_linear", "use_rotary_position_embeddings",
              "untie_embeddings_and_output_weights")

SHARD_FILE = re.compile(r"(model|optim)_tp(\d+)_pp(\d+)(?:_dp(\d+))?\.safetensors")


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank}_pp{pp_rank}.safetensors"


def optim_file(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"optim_tp{tp_rank}_pp{pp_rank}_dp{dp_rank}.safetensors"


def optim_key(name: str, kind: str, lo: int, hi: int) -> str:
    return f"{name}::{kind}::{lo}::{hi}"


class ShardReader:
    """Rebuilds full (unsharded) tensors of any saved layout, one parameter at a time."""

    def __init__(self, path: str, meta: dict):
        self.path, self.meta = path, meta
        self.model_files: defaultdict[str, dict] = defaultdict(dict)     # name -> {tp: file}
        self.optim: defaultdict[tuple, defaultdict] = defaultdict(lambda: defaultdict(list))
        # (name, kind) -> tp -> [(lo, hi, file, key)]
        self.step = 0
        for fname in sorted(meta["files"]):   # only what meta.json lists (and integrity.py verified)
            m = SHARD_FILE.fullmatch(fname)
            if not m:
                continue
            fp, tp = os.path.join(path, fname), int(m.group(2))
            with safe_open(fp, framework="pt") as f:
                if m.group(1) == "model":
                    for k in f.keys():
                        self.model_files[k][tp] = fp
                else:
                    self.step = int((f.metadata() or {}).get("step", 0))
                    for k in f.keys():
                        n, kind, lo, hi = k.split("::")
                        self.optim[(n, kind)][tp].append((int(lo), int(hi), fp, k))

    @property
    def has_optimizer_state(self) -> bool:
        return bool(self.optim)

    def _source_name(self, name: str) -> Optional[str]:
        """A PP=1 checkpoint has no output layer of a tied model: the last stage's copy is the embedding."""
        if name in self.model_files:
            return name
        return EMBEDDING if name == OUTPUT_LAYER and EMBEDDING in self.model_files and \
            not self.meta["config"]["model"].get("untie_embeddings_and_output_weights", False) else None

    def _info(self, name: str) -> dict:
        info = self.meta["params"].get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {self.path}: meta.json describes no parameter {name}")
        return info

    def _assemble(self, name: str, shards: dict) -> torch.Tensor:
        info = self._info(name)
        if info["split_dim"] is None or len(shards) == 1:
            return shards[min(shards)]
        return torch.cat([shards[t] for t in sorted(shards)], dim=info["split_dim"])

    def model_tensor(self, name: str) -> Optional[torch.Tensor]:
        src = self._source_name(name)
        if src is None:
            return None
        shards = {}
        for tp, fp in self.model_files[src].items():
            with safe_open(fp, framework="pt") as f:
                shards[tp] = f.get_tensor(src)
        return self._assemble(src, shards)

    def optim_tensor(self, name: str, kind: str) -> Optional[torch.Tensor]:
        src = name if (name, kind) in self.optim else self._source_name(name)
        if src is None or (src, kind) not in self.optim:
            return None
        info = self._info(src)
        saved_tp = self.meta["layout"]["tp"]
        shape = list(info["shape"])
        if info["split_dim"] is not None:
            shape[info["split_dim"]] //= saved_tp
        shards = {}
        for tp, pieces in self.optim[(src, kind)].items():
            flat = torch.zeros(int(torch.tensor(shape).prod()), dtype=torch.float32)
            for lo, hi, fp, key in pieces:
                with safe_open(fp, framework="pt") as f:
                    flat[lo:hi] = f.get_tensor(key)
            shards[tp] = flat.view(shape)
        return self._assemble(src, shards)


def to_local(full: torch.Tensor, info: dict, vocab: int, tp: int, tp_rank: int) -> torch.Tensor:
    """Trim/pad vocabulary rows to this layout's padding, then cut this rank's TP slice.

    `info`: the current parameter's {"shape": full shape at this layout, "split_dim": TP split or None}."""
    want = tuple(info["shape"])
    if full.shape[0] != want[0] and len(want) == 2 and full.shape[1:] == torch.Size(want[1:]):
        rows = full[:vocab]
        full = torch.cat([rows, rows.new_zeros(want[0] - rows.shape[0], *want[1:])]) if want[0] > vocab else rows
    if tuple(full.shape) != want:
        raise CheckpointError(f"parameter shape mismatch: checkpoint has {tuple(full.shape)}, model needs {want}")
    if info["split_dim"] is not None:
        full = full.chunk(tp, dim=info["split_dim"])[tp_rank]
    return full


# Shape settings whose unset value means a default derived from others: compared as resolved (ModelConfig's
# property), so `--num-key-value-heads` equal to the heads, or `--ffn-hidden-size` equal to 4 x hidden, is the
# same model as leaving them unset.
RESOLVED = {"num_key_value_heads": "kv_heads", "ffn_hidden_size": "ffn_size"}


def check_compatible(meta: dict, model_cfg) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = ModelConfig(**{k: v for k, v in meta["config"]["model"].items() if k in known})
    for k in SHAPE_KEYS:
        mine, theirs = (getattr(c, RESOLVED.get(k, k)) for c in (model_cfg, saved))
        if mine != theirs:
            raise CheckpointError(f"checkpoint model has {k}={theirs!r} but this run has {mine!r}: incompatible "
                                  "model shape")
    raw = meta["config"]["model"]
    learned = raw.get("add_position_embedding")   # absent (older checkpoints): learned positions iff no RoPE
    learned = not raw.get("use_rotary_position_embeddings") if learned is None else learned
    if learned != model_cfg.learned_positions:
        raise CheckpointError(f"checkpoint model {'has' if learned else 'has no'} learned position embeddings but "
                              f"this run's {'has none' if learned else 'has'} (--add-position-embedding): "
                              "incompatible model shape")
