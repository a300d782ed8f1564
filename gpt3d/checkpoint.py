"""Checkpoints that survive crashes and load at any TP/PP/DP layout.

Layout of SAVE/:
    latest                        name of the newest complete checkpoint, written last
    iter_0000100/
      meta.json                   iteration, data position, layout, config, scaler, each file's size
      model_tp{t}_pp{p}.safetensors          this (tp, pp) shard of every parameter, by global name
      optim_tp{t}_pp{p}_dp{d}.safetensors    fp32 master + Adam moments, in parameter space
      rng_rank{r}.pt

Every rank writes into iter_X.tmp/, then rank 0 writes meta.json, fsyncs and
renames the directory, and only then updates `latest`. A directory without a
valid meta.json (or whose files do not have the recorded sizes) is never
loaded. Loading rebuilds each full tensor from the saved shards and cuts this
rank's slice, so any saved layout loads into any other.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from . import atomic
from .errors import CheckpointError
from .metrics import warn
from .model.gpt import EMBEDDING, OUTPUT_LAYER, VOCAB_PARAMETERS, padded_vocab_size
from .parallel.layers import full_shape
from .parallel.random import rng_state, set_rng_state

SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "ffn_hidden_size",
              "swiglu", "normalization", "disable_bias_linear", "use_rotary_position_embeddings",
              "untie_embeddings_and_output_weights")


# ----- save -------------------------------------------------------------------------------------------------------
def save_checkpoint(root: str, trainer, keep_last: Optional[int] = None) -> str:
    """Write iter_X.tmp/, verify every rank succeeded, rename, then point `latest` at it.

    A failure on any rank (a full disk, a dead filesystem) is shared with every
    rank, so all raise the same CheckpointError instead of one raising while the
    others wait in a collective; the half-written directory is removed and
    `latest` still names the previous checkpoint.
    """
    ps = trainer.ps
    name = f"iter_{trainer.iteration:07d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    err = None
    if ps.rank == 0:
        try:
            _start(root, tmp)
        except OSError as e:
            err = str(e)
    err = _first_error(ps, err)
    if err:
        raise CheckpointError(f"could not write checkpoint {final}: {err}")
    sizes, err = {}, None
    try:
        sizes = _write_rank_files(tmp, trainer)
    except Exception as e:  # noqa: BLE001 - safetensors/torch raise their own types for OS failures
        err = str(e) or type(e).__name__
    gathered = [(sizes, _param_meta(trainer), err)]
    if ps.distributed:   # every stage describes its own parameters
        mine, gathered = gathered[0], [None] * ps.world_size
        dist.all_gather_object(gathered, mine)
    err = next((f"rank {r}: {e}" if ps.distributed else e for r, (_, _, e) in enumerate(gathered) if e), None)
    if ps.rank == 0 and err is None:
        meta = _meta(trainer)
        meta["files"] = {k: v for d, _, _ in gathered for k, v in d.items()}
        meta["params"] = {k: v for _, d, _ in gathered for k, v in d.items()}
        try:
            _finish(root, name, tmp, meta)
        except OSError as e:
            err = str(e)
    err = _first_error(ps, err)
    if err:
        if ps.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {err}; previous checkpoints are intact")
    if ps.rank == 0:
        _prune(root, name, keep_last)
    ps.barrier()
    return final


def _start(root: str, tmp: str) -> None:
    """An empty temporary directory for a checkpoint (a leftover of a killed save is discarded)."""
    os.makedirs(root, exist_ok=True)
    atomic.fresh_dir(tmp)


def _finish(root: str, name: str, tmp: str, meta: dict) -> None:
    """meta.json last inside tmp, then the rename, then `latest`: a reader never sees a partial checkpoint."""
    atomic.write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
    atomic.publish_dir(tmp, os.path.join(root, name))
    atomic.write_text(os.path.join(root, "latest"), name)


def _first_error(ps, err: Optional[str]) -> Optional[str]:
    """Rank 0's verdict, shared with every rank (rank 0 is the one that creates and renames)."""
    if not ps.distributed:
        return err
    box = [err]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_rank_files(tmp: str, trainer) -> dict:
    """This rank's model shard (first DP rank only), optimizer shard and RNG state; returns their sizes."""
    ps, opt = trainer.ps, trainer.optimizer
    files = []
    tag = f"tp{ps.tp_rank}_pp{ps.pp_rank}"
    if ps.dp_rank == 0:
        tensors = {n: p.detach().contiguous().cpu() for c in trainer.chunks for n, p in c.named_parameters()}
        files.append(_save_st(tensors, os.path.join(tmp, f"model_{tag}.safetensors")))
    state = opt.state_dict()
    step = state["step"]
    flat = {f"{n}::{kind}::{lo}::{hi}": t.contiguous().cpu()
            for (n, lo, hi), kinds in state["pieces"].items() for kind, t in kinds.items()}
    files.append(_save_st(flat, os.path.join(tmp, f"optim_{tag}_dp{ps.dp_rank}.safetensors"),
                          {"step": str(step)}))
    rng_path = os.path.join(tmp, f"rng_rank{ps.rank}.pt")
    torch.save(rng_state(trainer.tp_rng), rng_path)
    atomic.fsync_file(rng_path)
    files.append(rng_path)
    return {os.path.basename(f): os.path.getsize(f) for f in files}


def _prune(root: str, newest: str, keep_last: Optional[int]) -> None:
    """Keep `newest` and the keep_last-1 checkpoints before it; drop .tmp leftovers of saves killed mid-write.

    Checkpoints named after `newest` (a run resumed from an older one) are left alone."""
    older = [d for d in list_checkpoints(root) if d < newest]
    old = older[:len(older) - (keep_last - 1)] if keep_last else []
    stale = [d for d in os.listdir(root) if re.fullmatch(r"iter_\d{7}\.tmp", d) and d != newest + ".tmp"]
    for d in old + stale:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def save_weights(root: str, tensors: dict, params: dict, config: dict, vocab_size: int, padded_vocab: int) -> str:
    """A weights-only checkpoint at layout 1x1x1, iteration 0 (import-hf), written as atomically as a training one.

    `tensors` are the full parameters of a TP=1 model by name; `params` their shape/split metadata."""
    name = "iter_0000000"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    try:
        _start(root, tmp)
        model_file = _save_st({k: v.contiguous() for k, v in tensors.items()},
                              os.path.join(tmp, "model_tp0_pp0.safetensors"))
        meta = {"format": "gpt3d-1", "iteration": 0, "consumed_samples": 0, "tokens": 0,
                "layout": {"tp": 1, "pp": 1, "dp": 1, "zero": 1}, "vocab_size": vocab_size,
                "padded_vocab": padded_vocab, "config": config, "scaler": None,
                "files": {os.path.basename(model_file): os.path.getsize(model_file)}, "params": params}
        _finish(root, name, tmp, meta)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {final}: {e}") from e
    return final


def _save_st(tensors: dict, path: str, metadata: Optional[dict] = None) -> str:
    save_file(tensors, path, metadata=metadata)
    atomic.fsync_file(path)
    return path


def _param_meta(trainer) -> dict:
    return {n: {"shape": list(full_shape(p, trainer.ps.tp)), "split_dim": p.tp_split_dim,
                "tied_to": getattr(p, "tied_to", None)}
            for c in trainer.chunks for n, p in c.named_parameters()}


def _meta(trainer) -> dict:
    ps = trainer.ps
    return {
        "format": "gpt3d-1", "iteration": trainer.iteration, "consumed_samples": trainer.consumed_samples,
        "tokens": trainer.consumed_samples * trainer.cfg.model.seq_length,
        "layout": {"tp": ps.tp, "pp": ps.pp, "dp": ps.dp, "zero": trainer.optimizer.zero},
        "vocab_size": trainer.vocab_size, "padded_vocab": trainer.padded_vocab,
        "config": trainer.cfg.to_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
    }


def list_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if re.fullmatch(r"iter_\d{7}", d))


# ----- load -------------------------------------------------------------------------------------------------------
def _valid(path: str) -> Optional[str]:
    """None if the checkpoint directory is complete, else why not."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        return "no meta.json (incomplete save)"
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        return f"unreadable meta.json ({e})"
    for fname, size in meta.get("files", {}).items():
        fp = os.path.join(path, fname)
        if not os.path.exists(fp):
            return f"missing {fname}"
        if os.path.getsize(fp) != size:
            return f"{fname} has {os.path.getsize(fp)} bytes, expected {size} (truncated?)"
    return None


def resolve(root: str) -> str:
    """The newest complete checkpoint under `root` (or `root` itself if it is one)."""
    if os.path.exists(os.path.join(root, "meta.json")):
        why = _valid(root)
        if why:
            raise CheckpointError(f"checkpoint {root} is unusable: {why}")
        return root
    if not os.path.isdir(root):
        raise CheckpointError(f"no checkpoint directory {root}")
    candidates = list_checkpoints(root)
    latest_file = os.path.join(root, "latest")
    if os.path.exists(latest_file):
        with open(latest_file) as fh:
            name = fh.read().strip()
        if name in candidates:  # prefer what `latest` names, then anything older
            candidates = [c for c in candidates if c <= name]
    for name in reversed(candidates):
        why = _valid(os.path.join(root, name))
        if why is None:
            return os.path.join(root, name)
        warn(f"skipping checkpoint {os.path.join(root, name)}: {why}; falling back to an older one")
    raise CheckpointError(f"no complete checkpoint in {root}")


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as fh:
        return json.load(fh)


class _ShardReader:
    """Rebuilds full (unsharded) tensors of any saved layout, one parameter at a time."""

    def __init__(self, path: str, meta: dict):
        self.path, self.meta = path, meta
        self.model_files = defaultdict(dict)     # name -> {tp: file}
        self.optim = defaultdict(lambda: defaultdict(list))   # (name, kind) -> tp -> [(lo, hi, file, key)]
        self.step = 0
        for fname in sorted(os.listdir(path)):
            m = re.fullmatch(r"(model|optim)_tp(\d+)_pp(\d+)(?:_dp(\d+))?\.safetensors", fname)
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

    def _source_name(self, name: str) -> Optional[str]:
        if name in self.model_files:
            return name
        return EMBEDDING if name == OUTPUT_LAYER and EMBEDDING in self.model_files and \
            not self.meta["config"]["model"]["untie_embeddings_and_output_weights"] else None

    def _assemble(self, name: str, shards: dict) -> torch.Tensor:
        info = self.meta["params"][name]
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
        info = self.meta["params"][src]
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


def _to_local(full: torch.Tensor, p: torch.Tensor, vocab: int, ps) -> torch.Tensor:
    """Trim/pad vocabulary rows to this layout's padding, then cut this rank's TP slice."""
    want = full_shape(p, ps.tp)
    if full.shape[0] != want[0] and len(want) == 2 and full.shape[1:] == torch.Size(want[1:]):
        rows = full[:vocab]
        full = torch.cat([rows, rows.new_zeros(want[0] - rows.shape[0], *want[1:])]) if want[0] > vocab else rows
    if tuple(full.shape) != tuple(want):
        raise CheckpointError(f"parameter shape mismatch: checkpoint has {tuple(full.shape)}, model needs {want}")
    if p.tp_split_dim is not None:
        full = full.chunk(ps.tp, dim=p.tp_split_dim)[ps.tp_rank]
    return full


def check_compatible(meta: dict, cfg) -> None:
    saved = meta["config"]["model"]
    now = cfg.model
    for k in SHAPE_KEYS:
        if saved.get(k) != getattr(now, k):
            raise CheckpointError(f"checkpoint model has {k}={saved.get(k)!r} but this run has "
                                  f"{getattr(now, k)!r}: incompatible model shape")


def load_checkpoint(root: str, trainer) -> str:
    path = resolve(root)
    meta = read_meta(path)
    check_compatible(meta, trainer.cfg)
    if meta["vocab_size"] != trainer.vocab_size:
        raise CheckpointError(f"checkpoint vocabulary {meta['vocab_size']} != tokenizer's {trainer.vocab_size}")
    try:
        _load_state(path, meta, trainer)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a file that has the recorded size but not valid contents
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
    trainer.log.console(f"loaded checkpoint {path} (iteration {meta['iteration']}, saved at "
                        f"TP={meta['layout']['tp']} PP={meta['layout']['pp']} DP={meta['layout']['dp']})")
    return path


def _load_state(path: str, meta: dict, trainer) -> None:
    cfg, ps = trainer.cfg, trainer.ps
    reader = _ShardReader(path, meta)
    params = {n: p for c in trainer.chunks for n, p in c.named_parameters()}
    with torch.no_grad():
        for n, p in params.items():
            full = reader.model_tensor(n)
            if full is None:
                raise CheckpointError(f"checkpoint {path} has no tensor for parameter {n}")
            p.copy_(_to_local(full, p, trainer.vocab_size, ps).to(p.device, p.dtype))
    c = cfg.checkpoint
    if c.finetune or c.no_load_optim or not reader.optim:   # weights-only (e.g. import-hf) checkpoints
        trainer.optimizer.reload_masters_from_params()
    else:
        def get(name: str, kind: str) -> Optional[torch.Tensor]:
            full = reader.optim_tensor(name, kind)
            if full is None:
                return None
            return _to_local(full, params[name], trainer.vocab_size, ps).reshape(-1)
        pieces = {}
        for (name, lo, hi) in trainer.optimizer.state_dict()["pieces"]:
            kinds = {kind: get(name, kind) for kind in ("master", "exp_avg", "exp_avg_sq")}
            pieces[(name, lo, hi)] = {k: v[lo:hi] for k, v in kinds.items() if v is not None}
        trainer.optimizer.load_state_dict({"step": reader.step, "pieces": pieces})
    if not c.finetune:
        trainer.iteration = meta["iteration"]
        trainer.consumed_samples = meta["consumed_samples"]
        if trainer.scaler and meta.get("scaler"):
            trainer.scaler.load_state_dict(meta["scaler"])
        rng_file = os.path.join(path, f"rng_rank{ps.rank}.pt")
        same_layout = meta["layout"]["tp"] == ps.tp and meta["layout"]["pp"] == ps.pp and \
            meta["layout"]["dp"] == ps.dp
        if not c.no_load_rng and same_layout and os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False), trainer.tp_rng)


def read_model_tensors(root: str) -> tuple[str, dict, dict]:
    """(path, meta, {name: full tensor}) of a checkpoint at any saved layout, for export and inference.

    Tied copies (the last stage's output layer) are left out and padded vocabulary rows are cut off."""
    path = resolve(root)
    meta = read_meta(path)
    reader = _ShardReader(path, meta)
    tensors = {}
    for name, info in meta["params"].items():
        if info.get("tied_to"):
            continue
        full = reader.model_tensor(name)
        if full is None:
            raise CheckpointError(f"checkpoint {path} has no tensor for parameter {name}")
        tensors[name] = full[:meta["vocab_size"]] if name in VOCAB_PARAMETERS else full
    return path, meta, tensors


def describe(root: str) -> str:
    """Text for `gpt3d checkpoint-info`."""
    path = resolve(root)
    meta = read_meta(path)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    m = meta["config"]["model"]
    lay = meta["layout"]
    return "\n".join([
        f"checkpoint: {path}",
        f"iteration: {meta['iteration']}  tokens: {meta['tokens']:,}  consumed samples: {meta['consumed_samples']:,}",
        f"layout: TP={lay['tp']} PP={lay['pp']} DP={lay['dp']} ZeRO-{lay['zero']}",
        f"model: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
        f"seq {m['seq_length']}, vocab {meta['vocab_size']} (padded {meta['padded_vocab']})",
        f"size on disk: {size / 2 ** 20:.1f} MiB in {len(os.listdir(path))} files",
    ])


__all__ = ["save_checkpoint", "load_checkpoint", "read_model_tensors", "save_weights", "resolve", "describe",
           "CheckpointError", "padded_vocab_size"]
