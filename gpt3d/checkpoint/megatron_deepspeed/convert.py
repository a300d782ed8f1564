"""One Megatron-DeepSpeed file (or one pipeline stage's layer files) -> one gpt3d checkpoint shard file.

The gpt3d checkpoint keeps the saved run's layout (TP x PP x DP): every job reads the files of one shard and
returns the tensors of one gpt3d file, so memory stays at one shard whatever the model's size, and the
ranks of a job convert their share in parallel. gpt3d's reshard machinery (checkpoint/reshard.py) then
loads that checkpoint at any layout, as it loads its own.

Model jobs: the TP shard of every parameter of one (TP, PP) rank, renamed and rearranged by names.pieces.
Optimizer jobs: one ZeRO partition file (one DP rank of one (TP, PP) rank). DeepSpeed flattens each
optimizer group's parameters (in the order `param_shapes` lists them), pads the flat buffer at its end to a
multiple of the DP size, and gives DP rank d the elements [d*P, (d+1)*P); `param_slice_mappings` records,
per parameter, where its fragment starts in the partition and how long it is. The fragments are derived
here from param_shapes and P and checked against the recorded mappings, then written as gpt3d's
parameter-space pieces (`name::kind::lo::hi`, the element range of the flattened TP-local parameter) of the
fp32 master and both Adam moments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import CheckpointError
from ..reshard import model_file, optim_file, optim_key
from .names import Shapes, pieces, target
from .source import Checkpoint, Shard
from .unpickle import load

KINDS = ("master", "exp_avg", "exp_avg_sq")


@dataclass
class Job:
    out: str                  # the gpt3d file it writes
    shard: Shard
    dp: Optional[int] = None  # optimizer jobs: the DP rank of the partition


def plan(ckpt: Checkpoint, with_optimizer: bool) -> list[Job]:
    jobs = [Job(model_file(s.tp, s.pp), s) for s in ckpt.shards]
    if with_optimizer:
        jobs += [Job(optim_file(s.tp, s.pp, d), s, d) for s in ckpt.shards for d in sorted(s.optim_files)]
    return jobs


class Converter:
    """Runs jobs for one checkpoint; `layout` is gpt3d's {name: {"shape", "split_dim"}} of the full model."""

    def __init__(self, ckpt: Checkpoint, layout: dict, shapes: Shapes):
        self.ckpt, self.layout, self.shapes = ckpt, layout, shapes
        self.tied_owner = min((s.pp for s in ckpt.shards), default=0)   # the first stage's tied embedding

    def run(self, job: Job) -> tuple[dict, Optional[dict]]:
        """(tensors by gpt3d key, safetensors metadata) of the job's file."""
        if job.dp is None:
            return self._model(job.shard), None
        return self._optimizer(job.shard, job.dp)

    # ----- shared -------------------------------------------------------------------------------------------
    def _target(self, name: str, shard: Shard):
        if name.startswith("tied_modules.") and shard.pp != self.tied_owner:
            return None   # the last stage's copy of the tied embedding: the first stage's is the one kept
        return target(name, self.shapes, self.ckpt.layers if self.ckpt.pipeline else None)

    def _local_shape(self, name: str) -> list[int]:
        if name not in self.layout:
            raise CheckpointError(f"{self.ckpt.dir}: parameter {name} is not in the model the settings describe "
                                  "(another architecture?)")
        info = self.layout[name]
        shape = list(info["shape"])
        if info["split_dim"] is not None:
            shape[info["split_dim"]] //= self.ckpt.tp
        return shape

    # ----- weights ------------------------------------------------------------------------------------------
    def _sources(self, shard: Shard) -> dict:
        """{Megatron-DeepSpeed name: TP-local tensor} of one (TP, PP) rank."""
        if not self.ckpt.pipeline:
            module = load(shard.model_file).get("module")
            if not isinstance(module, dict):
                raise CheckpointError(f"{shard.model_file} holds no model weights")
            return {k: v.detach() for k, v in _flatten(module)}
        out = {}
        stage_names = {n for group in shard.param_shapes for n in group}
        for (idx, tp), path in sorted(self.ckpt.layer_files.items()):
            role = self.ckpt.layers[idx]
            prefix = "tied_modules.embed." if role == "embedding" and any(
                n.startswith("tied_modules.embed.") for n in stage_names) else f"{idx}."
            if tp != shard.tp or not any(n.startswith(prefix) for n in stage_names):
                continue
            state = load(path)
            out.update({prefix + k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor)})
        return out

    def _model(self, shard: Shard) -> dict:
        out, covered = {}, {}
        for name, src in self._sources(shard).items():
            t = self._target(name, shard)
            if t is None:
                continue
            flat = src.reshape(-1)
            for dst, dlo, slo, n in pieces(t, flat.numel(), 0, flat.numel(), self.shapes):
                if dst not in out:
                    out[dst] = torch.empty(self._local_shape(dst), dtype=src.dtype)
                    covered[dst] = 0
                if (t.gate is None and t.qkv is None and src.shape != out[dst].shape) or dlo + n > out[dst].numel():
                    raise CheckpointError(f"{shard.model_file}: {name} has shape {tuple(src.shape)}; the run's args "
                                          f"give {dst} a TP shard of {tuple(out[dst].shape)}")
                out[dst].view(-1)[dlo:dlo + n] = flat[slo:slo + n]
                covered[dst] += n
        for dst, n in covered.items():
            if n != out[dst].numel():
                raise CheckpointError(f"{shard.model_file}: {dst} got {n} of its {out[dst].numel()} elements "
                                      "(shapes differ from the settings)")
        return out

    # ----- optimizer state ----------------------------------------------------------------------------------
    def _optimizer(self, shard: Shard, dp: int) -> tuple[dict, dict]:
        path = shard.optim_files[dp]
        osd = load(path).get("optimizer_state_dict")
        try:
            partitions = osd["single_partition_of_fp32_groups"]
            state = osd["base_optimizer_state"]["state"]
            mappings = osd.get("param_slice_mappings")
            steps = {int(state[g]["step"]) for g in range(len(partitions))}
        except (KeyError, TypeError, IndexError) as e:
            raise CheckpointError(f"{path}: not a DeepSpeed ZeRO stage 1/2 optimizer state ({e!r} missing)") from None
        if len(steps) != 1:
            raise CheckpointError(f"{path}: optimizer groups at different steps {sorted(steps)}")
        if len(partitions) != len(shard.param_shapes):
            raise CheckpointError(f"{path}: {len(partitions)} optimizer groups, {shard.model_file} describes "
                                  f"{len(shard.param_shapes)}")
        out = {}
        for g, partition in enumerate(partitions):
            flats = {"master": partition.detach(), "exp_avg": state[g]["exp_avg"].detach(),
                     "exp_avg_sq": state[g]["exp_avg_sq"].detach()}
            recorded = mappings[g] if mappings is not None else None
            frags = fragments(shard.param_shapes[g], partition.numel(), self.ckpt.dp, dp, path)
            if recorded is not None and set(recorded) != set(frags):
                raise CheckpointError(f"{path}: group {g} records fragments of {len(recorded)} parameters, its "
                                      f"parameter order and shapes give {len(frags)}")
            for name, (start, n, lo, numel) in frags.items():
                if recorded is not None:
                    got = recorded.get(name)
                    if got is None or (got.get("start"), got.get("numel")) != (start, n):
                        raise CheckpointError(f"{path}: {name}'s fragment is recorded at {_addr(got)}, but the "
                                              f"parameter order and shapes put it at start {start}, numel {n}")
                t = self._target(name, shard)
                if t is None:
                    continue
                for dst, dlo, slo, k in pieces(t, numel, lo, lo + n, self.shapes):
                    for kind, flat in flats.items():
                        out[optim_key(dst, kind, dlo, dlo + k)] = flat[start + slo:start + slo + k].float().clone()
        return out, {"step": str(steps.pop())}


def fragments(shapes: dict, partition: int, dp_size: int, dp: int, path: str = "") -> dict:
    """{name: (start in DP rank `dp`'s partition, length, start in the flattened parameter, its numel)} of
    the parameters (in `shapes` order) whose flattened elements fall in that partition."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    if partition * dp_size < total:
        raise CheckpointError(f"{path}: {dp_size} partitions of {partition} elements cannot hold the "
                              f"{total} elements of their parameters")
    lo_p, hi_p = dp * partition, (dp + 1) * partition
    out, offset = {}, 0
    for name, n in sizes.items():
        a, b = max(offset, lo_p), min(offset + n, hi_p)
        if a < b:
            out[name] = (a - lo_p, b - a, a - offset, n)
        offset += n
    return out


def _addr(frag) -> str:
    return "nothing" if frag is None else f"start {frag.get('start')}, numel {frag.get('numel')}"


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield prefix + k, v
