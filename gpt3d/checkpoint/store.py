"""The checkpoint directory: the crash-safe save sequence, the one place its files are written, and loading.

Save: rank 0 creates a fresh temporary directory beside iter_X (atomic.new_dir) and shares its name; every
rank lets each part write through a `Writer`; one all-gather collects every rank's files and meta entries
(and errors); rank 0 writes meta.json last, fsyncs, renames the directory, and only then rewrites `latest`.
A failure on any rank is shared with every rank, so all raise the same CheckpointError instead of one
raising while the others wait in a collective; the half-written directory is removed and `latest` still
names the previous checkpoint.

Load: the newest good checkpoint (integrity.py: complete, nothing in it that meta.json does not list, every
file with its recorded size and checksum, nothing non-finite); a training run splits the checksum reads over
its ranks and skips a bad newest one with a warning naming the file, read-only commands refuse it. Each part
reads what it needs through a `Reader`, resharding to the current layout, and only files meta.json lists;
nothing is unpickled (state is safetensors and JSON; a legacy .pt file is read with torch.load's
weights_only unpickler, which builds tensors and plain containers only). An error on any rank (a
non-finite tensor, say) is shared, so every rank raises the same CheckpointError.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Optional
from collections.abc import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import atomic
from ..errors import CheckpointError, warn
from ..optim.zero import describe_zero
from ..parallel.state import ParallelState
from .integrity import (checked_files, checksum_problem, file_checksum, non_finite, read_meta, structure_problem,
                        with_meta_checksum)
from .meta_check import saved_model_config
from .reshard import ShardReader

FORMAT = "gpt3d-1"


class Writer:
    """Where parts put their state: files in the checkpoint's temporary directory and entries of meta.json.

    Every checkpoint file goes through here: its checksum is taken right after the write (from the page
    cache), it is fsynced, and its size and checksum are recorded for the integrity checks (integrity.py)."""

    def __init__(self, tmp: str, ps: ParallelState):
        self.tmp, self.ps = tmp, ps
        self.files: dict[str, int] = {}
        self.checksums: dict[str, str] = {}
        self.non_finite: dict[str, list] = {}
        self.entries: dict = {}

    def _done(self, path: str) -> None:
        name = os.path.relpath(path, self.tmp)
        self.checksums[name] = file_checksum(path)
        atomic.fsync_file(path)
        self.files[name] = os.path.getsize(path)

    def tensors(self, name: str, tensors: dict, metadata: Optional[dict] = None) -> None:
        """A safetensors file of CPU tensors; floating ones that are not finite mark the checkpoint bad."""
        bad = non_finite(tensors)
        if bad:
            self.non_finite[name] = bad
        path = os.path.join(self.tmp, name)
        save_file(tensors, path, metadata=metadata)
        atomic.honour_umask(path)   # safetensors creates its files 0600
        self._done(path)

    def copy(self, name: str, src: str) -> str:
        """A copy of the user's file `src` as `name` (e.g. "tokenizer/vocab.json"; subdirectories are
        created); returns the copy's path."""
        path = os.path.join(self.tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(src, path)
        self._done(path)
        return path

    def meta(self, key: str, value) -> None:
        """An entry of meta.json. Entries from all ranks are merged: dicts are unioned (each pipeline stage
        describes its own parameters), other values are taken from the lowest rank that gives them."""
        if isinstance(value, dict) and isinstance(self.entries.get(key), dict):
            self.entries[key].update(value)
        else:
            self.entries.setdefault(key, value)


@dataclass
class Reader:
    """A complete checkpoint as the parts see it when loading."""
    path: str
    meta: dict
    ps: ParallelState
    _shards: Optional[ShardReader] = field(default=None, repr=False)

    @property
    def shards(self) -> ShardReader:
        if self._shards is None:
            self._shards = ShardReader(self.path, self.meta)
        return self._shards

    def same_layout(self) -> bool:
        lay = self.meta["layout"]
        return (lay["tp"], lay["pp"], lay["dp"]) == (self.ps.tp, self.ps.pp, self.ps.dp)

    def has(self, name: str) -> bool:
        """Whether meta.json lists the file `name` (only listed files are ever opened)."""
        return name in self.meta["files"]

    def tensors(self, name: str) -> Optional[tuple[dict, dict]]:
        """({name: tensor}, metadata) of a listed safetensors file written by Writer.tensors, or None if
        meta.json lists no file of that name."""
        if not self.has(name):
            return None
        with safe_open(os.path.join(self.path, name), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})

    def legacy_object(self, name: str):
        """A listed torch.save file of an older checkpoint (RNG states), read with the weights-only unpickler
        (tensors, numpy arrays, plain containers; no code runs), or None if meta.json lists no such file."""
        if not self.has(name):
            return None
        path = os.path.join(self.path, name)
        try:
            with torch.serialization.safe_globals(_LEGACY_GLOBALS):
                return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - the unpickler raises its own types for what it refuses
            why = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: refused: not plain tensors and arrays ({why}); gpt3d never runs "
                                  "code from a checkpoint (--no-load-rng resumes without this file)") from None


# What older checkpoints' RNG pickles hold besides tensors: numpy's RNG key array (and its dtype), under the
# names numpy 1.x and 2.x pickle it with. The weights-only unpickler builds only these and plain containers.
def _legacy_globals() -> list:
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:   # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    kinds = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8)]
    return [np.ndarray, np.dtype, *kinds, (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct")]


_LEGACY_GLOBALS = _legacy_globals()


@dataclass
class Loaded:
    path: str
    meta: dict
    parts: set          # names of the parts that restored state


# ----- save -------------------------------------------------------------------------------------------------------
def save(root: str, parts: dict, ps: ParallelState, iteration: int, keep_last: Optional[int] = None) -> str:
    """Write every part as checkpoint iter_<iteration> under `root` (see the module docstring); its path."""
    name = f"iter_{iteration:07d}"
    final, tmp, err = os.path.join(root, name), None, None
    if ps.rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            err = _not_replaceable(final)
            tmp = None if err else atomic.new_dir(final)   # a fresh name: nothing planted is followed
        except OSError as e:
            err = str(e)
    err, tmp = _from_rank0(ps, (err, tmp))
    if err:
        raise CheckpointError(f"could not write checkpoint {final}: {err}")
    w, err = Writer(tmp, ps), None
    w.meta("format", FORMAT)
    w.meta("layout", {"tp": ps.tp, "pp": ps.pp, "dp": ps.dp})
    try:
        for part in parts.values():
            part.save(w)
    except Exception as e:  # noqa: BLE001 - safetensors/torch raise their own types for OS failures
        err = str(e) or type(e).__name__
    gathered = [(w.files, w.entries, err, w.checksums, w.non_finite)]
    if ps.distributed:
        mine, gathered = gathered[0], [None] * ps.world_size  # type: ignore[list-item]  # all_gather_object fills it
        dist.all_gather_object(gathered, mine)
    err = next((f"rank {r}: {g[2]}" if ps.distributed else g[2] for r, g in enumerate(gathered) if g[2]), None)
    bad = {k: v for g in gathered for k, v in g[4].items()} if ps.rank == 0 else {}
    if ps.rank == 0 and err is None:
        merged = Writer(tmp, ps)
        for _, entries, _, _, _ in gathered:
            for key, value in entries.items():
                merged.meta(key, value)
        meta = {**merged.entries, "files": {k: v for g in gathered for k, v in g[0].items()},
                "checksums": {k: v for g in gathered for k, v in g[3].items()}}
        if bad:   # kept (it may help a post-mortem) but never resumed from nor called good
            meta["non_finite"] = bad
            warn(f"checkpoint {final} holds non-finite values ({', '.join(sorted(bad))}): it is written but "
                 "is not a good checkpoint")
        try:   # meta.json last inside tmp, then the rename, then `latest`: never a partial checkpoint
            atomic.write_text(os.path.join(tmp, "meta.json"), json.dumps(with_meta_checksum(meta), indent=1))
            atomic.publish_dir(tmp, final)
            atomic.write_text(os.path.join(root, "latest"), name)
        except OSError as e:
            err = str(e)
    err = _from_rank0(ps, err)
    if err:
        if ps.rank == 0:
            atomic.remove_created(tmp)
        raise CheckpointError(f"could not write checkpoint {final}: {err}; previous checkpoints are intact")
    if ps.rank == 0 and not bad:   # a bad newest checkpoint must not push the last good one out
        _prune(root, name, keep_last)
    ps.barrier()
    return final


def _not_replaceable(final: str) -> Optional[str]:
    """Why an existing `final` must not be replaced by a new save (None if it may: absent, or a checkpoint
    directory of an earlier timeline, which a save of the same iteration replaces)."""
    if not os.path.lexists(final):
        return None
    if os.path.islink(final) or not os.path.isdir(final) or not os.path.isfile(os.path.join(final, "meta.json")):
        return f"{final} exists and is not a checkpoint gpt3d wrote (no meta.json, or not a directory): move it away"
    return None


def _from_rank0(ps: ParallelState, value):
    """Rank 0's `value` (its verdict, the temporary directory it created), shared with every rank."""
    if not ps.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _prune(root: str, newest: str, keep_last: Optional[int]) -> None:
    """Keep `newest` and the keep_last-1 checkpoints before it; drop the temporary directories of saves
    killed mid-write (this run holds the directory's lock, so no other save is in progress).

    Only what gpt3d's saves create is removed: checkpoint directories (iter_XXXXXXX with a meta.json) and
    temporaries by their name (files/atomic.py's, and `iter_XXXXXXX.tmp` of older versions). Checkpoints named
    after `newest` (a run resumed from an older one) are left alone."""
    older = [d for d in list_checkpoints(root) if d < newest]
    old = [d for d in (older[:len(older) - (keep_last - 1)] if keep_last else [])
           if _not_replaceable(os.path.join(root, d)) is None]
    stale = [d for d in os.listdir(root) if re.fullmatch(r"\.iter_\d{7}\.tmp-.+", d) and atomic.is_temporary(d)
             or re.fullmatch(r"iter_\d{7}\.tmp", d) and not os.path.islink(os.path.join(root, d))]
    for d in old + stale:
        atomic.remove_created(os.path.join(root, d))


def list_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if re.fullmatch(r"iter_\d{7}", d))


# ----- load -------------------------------------------------------------------------------------------------------
def load(root: str, parts: dict, ps: ParallelState, skip: frozenset = frozenset()) -> Loaded:
    """Restore every part not in `skip` from the newest good checkpoint under `root`, in `parts` order.
    A collective: every rank verifies a share of the files and all agree on the checkpoint and the outcome."""
    path = resolve(root, ps=ps)
    reader = Reader(path, read_meta(path), ps)
    restored, err = set(), None
    try:
        for name, part in parts.items():
            if name in skip:
                continue
            if part.load(reader):
                restored.add(name)
    except CheckpointError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - a file that has the recorded size but not valid contents
        err = f"checkpoint {path} is unreadable ({type(e).__name__}: {e})"
    err = _any_error(ps, err)
    if err:
        raise CheckpointError(err)
    return Loaded(path, reader.meta, restored)


def _any_error(ps: ParallelState, err: Optional[str]) -> Optional[str]:
    """The first rank's error, on every rank (None if no rank has one)."""
    if not ps.distributed:
        return err
    errors = [None] * ps.world_size
    dist.all_gather_object(errors, err)
    return next((e for e in errors if e), None)


def _problem(path: str, ps: Optional[ParallelState], wanted: Optional[Callable[[str], bool]]) -> Optional[str]:
    """integrity.problem, with the checksum reads split over the ranks of `ps` (the same verdict on all)."""
    why = structure_problem(path)
    if why is None:
        files = checked_files(path, wanted)
        if ps is not None and ps.distributed:
            files = files[ps.rank::ps.world_size]
        why = checksum_problem(path, files, progress=ps is None or ps.rank == 0)
    return _any_error(ps, why) if ps is not None else why


def holds_no_checkpoint(root: str) -> bool:
    """An existing directory with no checkpoint, `latest`, meta.json or leftover of a save at all: the first
    run of a launch script that always passes --load (Megatron-DeepSpeed's do), which starts from scratch.
    Anything partial still goes through `resolve`'s checks."""
    return os.path.isdir(root) and not any(n in ("latest", "meta.json") or n.startswith("iter_")
                                           for n in os.listdir(root))


def resolve(root: str, ps: Optional[ParallelState] = None, fallback: bool = True,
            wanted: Optional[Callable[[str], bool]] = None) -> str:
    """The newest good checkpoint under `root` (or `root` itself if it is one), its files' checksums verified
    (all, or those `wanted`; `lambda f: False` checks sizes only).

    A directory without meta.json (a save that never finished) is skipped. A bad one (truncated, corrupt,
    non-finite) is skipped with a warning naming the file when `fallback` (a training run resumes from the
    previous good one); otherwise (eval, export, generate) it is refused. `ps`: split the reads over its ranks
    (a collective; warnings from rank 0)."""
    speak = ps is None or ps.rank == 0
    if os.path.exists(os.path.join(root, "meta.json")):
        why = _problem(root, ps, wanted)
        if why:
            raise CheckpointError(f"checkpoint {root} is unusable: {why}")
        return root
    if not os.path.isdir(root):
        raise CheckpointError(f"no checkpoint directory {root}")
    candidates = list_checkpoints(root)
    latest_file = os.path.join(root, "latest")
    if os.path.isfile(latest_file):
        with open(latest_file, "rb") as fh:
            name = fh.read(64).decode("utf-8", "replace").strip()
        if name in candidates:  # prefer what `latest` names, then anything older
            candidates = [c for c in candidates if c <= name]
    for name in reversed(candidates):
        path = os.path.join(root, name)
        why = _problem(path, ps, wanted)
        if why is None:
            return path
        if not fallback and os.path.exists(os.path.join(path, "meta.json")):
            raise CheckpointError(f"checkpoint {path} is unusable: {why} (`gpt3d checkpoint verify {root}` "
                                  "lists the good ones; pass one of them)")
        if speak:
            warn(f"skipping checkpoint {path}: {why}; falling back to an older one")
    raise CheckpointError(f"no complete checkpoint in {root}")


def describe(root: str) -> str:
    """Text for `gpt3d checkpoint-info` (sizes checked, not checksums: `gpt3d checkpoint verify` reads them)."""
    path = resolve(root, wanted=lambda f: False)
    meta = read_meta(path)
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    size = sum(os.path.getsize(f) for f in files)
    m = dataclasses.asdict(saved_model_config(meta["config"]))
    lay = meta["layout"]
    stage = meta["config"].get("parallel", {}).get("zero_stage", lay.get("zero"))
    zero = describe_zero(stage, lay["dp"]) if "zero" in lay else "weights only"
    tokens = f"{meta['tokens']:,}" if "tokens" in meta else "not recorded"
    return "\n".join([
        f"checkpoint: {path}",
        f"iteration: {meta['iteration']}  tokens: {tokens}  consumed samples: {meta['consumed_samples']:,}",
        f"layout: TP={lay['tp']} PP={lay['pp']} DP={lay['dp']} {zero}",
        f"model: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
        f"seq {m['seq_length']}, vocab {meta['vocab_size']} (padded {meta['padded_vocab']})",
        f"tokenizer: {_tokenizer_line(meta.get('tokenizer'))}",
        f"size on disk: {size / 2 ** 20:.1f} MiB in {len(files)} files",
    ])


def _tokenizer_line(manifest: Optional[dict]) -> str:
    if not manifest:
        return "none carried (mock data, or saved before checkpoints carried their tokenizer)"
    names = ", ".join(manifest.get("files", {})) or f"vocab {manifest.get('vocab_size')}"
    return (f"{manifest['type']} ({names}; eod {manifest.get('eod_token')!r} = {manifest.get('eod')}, "
            f"fingerprint {manifest['fingerprint'][:12]})")
