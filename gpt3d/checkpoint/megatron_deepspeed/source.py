"""Which Megatron-DeepSpeed checkpoint a directory holds and what its files are.

Megatron-DeepSpeed saves through DeepSpeed: DIR/latest names a tag directory (global_stepN) holding, per
model-parallel rank XX, `mp_rank_XX_model_states.pt` (the run's args, iteration, scheduler, RNG; without the
pipeline engine also the module's weights) and per data-parallel rank D `[bf16_]zero_pp_rank_D_mp_rank_XX_
optim_states.pt` (that rank's ZeRO partition of the fp32 masters and Adam moments). With the pipeline engine
the weights are in `layer_II-model_TT-model_states.pt` instead, one per pipeline layer II and TP rank TT.

This module only finds and classifies files and reads the small metadata every other step needs (the args,
the pipeline engine's layer index, which shard is which TP/PP rank). Reading the tensors is the converter's
job, one shard at a time.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from ...errors import CheckpointError
from .unpickle import load

TAG = re.compile(r"global_step(\d+)")
MODEL_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
OPTIM_FILE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def _holds_model_states(path: str) -> bool:
    return os.path.isdir(path) and any(MODEL_FILE.fullmatch(f) for f in os.listdir(path))


def tag_dir(path: str, iteration: Optional[int] = None) -> Optional[str]:
    """The global_stepN directory a path names: itself, `global_step{iteration}` under it, or the one its
    `latest` file names (DeepSpeed's); None when the path is no Megatron-DeepSpeed checkpoint (a gpt3d one has
    meta.json files and iter_XXXXXXX directories instead)."""
    if iteration is not None:
        return os.path.join(path, f"global_step{iteration}")
    if _holds_model_states(path):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        try:
            with open(latest) as fh:
                tag = fh.read(4096).strip()
        except (OSError, UnicodeDecodeError):
            return None
        if tag and "/" not in tag and _holds_model_states(os.path.join(path, tag)):
            return os.path.join(path, tag)
    return None


def is_checkpoint(path: Optional[str]) -> bool:
    return path is not None and bool(path) and tag_dir(path) is not None


@dataclass
class Shard:
    """One model-parallel rank of the saved run: its TP and PP rank, its files."""
    mp: int
    tp: int
    pp: int
    model_file: str
    optim_files: dict = field(default_factory=dict)   # dp rank -> path
    param_shapes: list = field(default_factory=list)  # per optimizer group: {name: TP-local shape}


class Checkpoint:
    """One saved iteration of a Megatron-DeepSpeed run: metadata and the file of each shard.

    `args` is the run's argparse namespace as a dict; `pipeline` says whether the pipeline engine wrote it
    (layer files) or not (weights inside the mp_rank files); `layers` maps each pipeline layer index to its
    role ("embedding", ("layer", i), "final_norm", "output_layer") and `layer_files[(index, tp)]` to a path."""

    def __init__(self, path: str, iteration: Optional[int] = None):
        self.root = path
        d = tag_dir(path, iteration)
        if d is None or not os.path.isdir(d):
            what = f"global_step{iteration}" if iteration is not None else "a `latest` naming a global_stepN"
            raise CheckpointError(f"{path} is not a Megatron-DeepSpeed checkpoint (no {what} directory with "
                                  "mp_rank_XX_model_states.pt files)")
        self.dir = d
        names = sorted(os.listdir(d))
        models = {int(m.group(1)): os.path.join(d, f) for f in names if (m := MODEL_FILE.fullmatch(f))}
        if not models or 0 not in models:
            raise CheckpointError(f"{d} has no mp_rank_00_model_states.pt")
        first = self._state(models[0])
        args = vars(first["args"]) if first.get("args") is not None else None
        if not isinstance(args, dict):
            raise CheckpointError(f"{models[0]} holds no Megatron args (not written by Megatron-DeepSpeed?)")
        self.args: dict = args
        a = self.args
        self.iteration = int(first.get("iteration", first.get("global_steps", 0)))
        self.tokens = int(first.get("tokens", a.get("consumed_train_tokens") or 0))
        self.consumed_samples = int(a.get("consumed_train_samples") or first.get("global_samples") or 0)
        self.checkpoint_version = first.get("checkpoint_version")
        self.lr_scheduler = first.get("lr_scheduler") or {}
        self.ds_config = first.get("ds_config") or a.get("deepspeed_config_dict") or {}
        self.tp = int(a.get("tensor_model_parallel_size") or 1)
        self.pp = int(a.get("pipeline_model_parallel_size") or 1)
        self.dp = int(first.get("dp_world_size") or a.get("data_parallel_size") or 1)
        layer_files = {(int(m.group(1)), int(m.group(2))): os.path.join(d, f)
                       for f in names if (m := LAYER_FILE.fullmatch(f))}
        self.pipeline = bool(layer_files)
        if self.pipeline != bool(a.get("ds_pipeline_enabled", self.pipeline)):
            raise CheckpointError(f"{d}: the files do not match the run's args (ds_pipeline_enabled="
                                  f"{a.get('ds_pipeline_enabled')}, layer files: {len(layer_files)})")
        if not self.pipeline and self.pp != 1:
            raise CheckpointError(f"{d}: a Megatron-DeepSpeed checkpoint with pipeline parallelism {self.pp} but "
                                  "without the pipeline engine's layer files is not a layout gpt3d knows")
        if len(models) != self.tp * self.pp:
            raise CheckpointError(f"{d} has {len(models)} mp_rank files, expected TP x PP = {self.tp} x {self.pp}")
        self.layer_files = layer_files
        self.layers = self._layer_roles() if self.pipeline else {}
        self.optimizer_prefix = ""
        self.shards = [self._shard(mp, f, first if mp == 0 else None) for mp, f in sorted(models.items())]
        for f in names:
            if m := OPTIM_FILE.fullmatch(f):
                dp, mp = int(m.group(2)), int(m.group(3))
                self.optimizer_prefix = m.group(1) or ""
                if mp not in models:
                    raise CheckpointError(f"{d}: {f} has no mp_rank_{mp:02d}_model_states.pt")
                self.shards[mp].optim_files[dp] = os.path.join(d, f)
        for s in self.shards:
            if s.optim_files and sorted(s.optim_files) != list(range(self.dp)):
                raise CheckpointError(f"{d}: optimizer files of model-parallel rank {s.mp} cover data-parallel "
                                      f"ranks {sorted(s.optim_files)}, expected 0..{self.dp - 1}")
        if len({(s.tp, s.pp) for s in self.shards}) != len(self.shards):
            raise CheckpointError(f"{d}: two mp_rank files claim the same TP/PP rank")

    @staticmethod
    def _state(path: str) -> dict:
        state = load(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict of model states, found {type(state).__name__}")
        return state

    @property
    def has_optimizer_state(self) -> bool:
        return all(s.optim_files for s in self.shards)

    def _shard(self, mp: int, path: str, state: Optional[dict]) -> Shard:
        """Which TP/PP rank wrote `path`: its `args.rank` in Megatron/DeepSpeed's rank order (TP innermost,
        then DP, then PP), written by the first DP rank."""
        state = state if state is not None else self._state(path)
        rank = int(getattr(state.get("args"), "rank", mp))
        tp, pp = rank % self.tp, rank // (self.tp * self.dp)
        if rank // self.tp % self.dp != 0 or pp >= self.pp:
            raise CheckpointError(f"{path} was written by rank {rank}, not by the first data-parallel rank of a "
                                  f"TP {self.tp} x PP {self.pp} x DP {self.dp} layout")
        shapes = state.get("param_shapes") or []
        return Shard(mp, tp, pp, path, param_shapes=[dict(g) for g in (shapes if isinstance(shapes, list)
                                                                       else [shapes])])

    def _layer_roles(self) -> dict:
        """Pipeline layer index -> role, from the keys of the layer files (their order is the model's)."""
        roles = {}
        for (idx, tp), path in sorted(self.layer_files.items()):
            if idx in roles or tp != 0:
                continue
            keys = set(load(path))
            if any(k.endswith("word_embeddings.weight") for k in keys):
                roles[idx] = "embedding"
            elif any(k.startswith("input_layernorm.") for k in keys):
                roles[idx] = "layer"
            elif keys and keys <= {"weight", "bias"}:
                roles[idx] = "final_norm"
            elif keys == {"lm_head.weight"}:
                roles[idx] = "output_layer"
            else:
                raise CheckpointError(f"{path}: a pipeline layer gpt3d does not know (parameters "
                                      f"{', '.join(sorted(keys))})")
        layer_ids = sorted(i for i, r in roles.items() if r == "layer")
        n = int(self.args.get("num_layers") or 0)
        if len(layer_ids) != n:
            raise CheckpointError(f"{self.dir}: {len(layer_ids)} transformer layer files, the args say {n} layers")
        out = {i: ("layer", layer_ids.index(i)) if r == "layer" else r for i, r in roles.items()}
        for (idx, tp) in self.layer_files:
            if idx not in out or tp >= self.tp:
                raise CheckpointError(f"{self.layer_files[(idx, tp)]}: no layer {idx} of TP rank {tp} expected")
        return out

    def describe(self) -> str:
        engine = "pipeline engine" if self.pipeline else "no pipeline engine"
        return (f"Megatron-DeepSpeed checkpoint {self.dir} (iteration {self.iteration}, TP={self.tp} PP={self.pp} "
                f"DP={self.dp}, {engine})")
