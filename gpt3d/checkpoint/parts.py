"""What a checkpoint holds: stateful parts, each mapping one object's state_dict() to files or meta.json.

A part wraps an object with `state_dict()` / `load_state_dict()` (the model chunks, the sharded optimizer,
the loss scaler, the RNG streams, the train state) and knows how that state is stored and resharded:

    part        object               stored as                                           loaded
    config      the run's Config     meta.json "config"                                 model shape checked
    model       ModelChunks          model_tp{t}_pp{p}.safetensors (first DP rank),      at any layout
                                     meta.json "vocab_size", "padded_vocab", "params"
    optimizer   ZeroOptimizer     optim_tp{t}_pp{p}_dp{d}.safetensors,                at any layout
                                     meta.json layout "zero"
    scaler      DynamicLossScaler    meta.json "scaler" (null without fp16)             always
    tokenizer   the run's Tokenizer  tokenizer/<its files> (rank 0), meta.json           checked: same
                                     "tokenizer" (manifest; tokenizer_part.py)           fingerprint
    rng         RNGState             rng_rank{r}.safetensors (older: rng_rank{r}.pt,     same layout only
                                     read weights-only)
    train       TrainState           meta.json top level: iteration, consumed_samples,  always
                                     tokens, data_state

A new part is a class with `save(writer)` and `load(reader) -> bool` (True if it restored something),
added to `training_parts`; files go through the Writer (store.py), never written here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Protocol

from ..config import CheckpointConfig, Config
from ..errors import CheckpointError
from ..parallel.random import TPRNG, RNGState
from ..parallel.random import from_tensors as rng_from_tensors
from ..parallel.random import to_tensors as rng_to_tensors
from ..parallel.state import ParallelState
from .integrity import non_finite
from .reshard import check_compatible, model_file, optim_file, optim_key, to_local
from .store import Reader, Writer
from .tokenizer_part import TokenizerPart


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Part(Protocol):
    def save(self, w: Writer) -> None: ...

    def load(self, r: Reader) -> bool: ...


# ----- parts ------------------------------------------------------------------------------------------------------
class ConfigPart:
    """The run's settings, for checkpoint-info, eval and export; loading checks the model shape fits."""

    def __init__(self, cfg: dict, model_cfg=None):
        self.cfg, self.model_cfg = cfg, model_cfg

    def save(self, w: Writer) -> None:
        w.meta("config", self.cfg)

    def load(self, r: Reader) -> bool:
        check_compatible(r.meta, self.model_cfg)
        return False   # nothing restored: the run's own config stays


class MetaPart:
    """A small JSON state in meta.json, under `key` (or merged at the top level when key is None)."""

    def __init__(self, obj: Optional[Stateful], key: Optional[str]):
        self.obj, self.key = obj, key

    def save(self, w: Writer) -> None:
        state = self.obj.state_dict() if self.obj is not None else None
        if self.key is None:
            assert state is not None, "a MetaPart merged at the top level has an object"
            for k, v in state.items():
                w.meta(k, v)
        else:
            w.meta(self.key, state)

    def load(self, r: Reader) -> bool:
        state = r.meta if self.key is None else r.meta.get(self.key)
        if self.obj is None or not state:
            return False
        self.obj.load_state_dict(state)
        return True


class RNGPart:
    """This rank's random streams as a safetensors file, restored only at the layout that wrote it. Older
    checkpoints hold them as rng_rank{r}.pt, read with the weights-only unpickler."""

    def __init__(self, obj: RNGState, ps: ParallelState):
        self.obj, self.file = obj, f"rng_rank{ps.rank}.safetensors"
        self.legacy_file = f"rng_rank{ps.rank}.pt"

    def save(self, w: Writer) -> None:
        w.tensors(self.file, *rng_to_tensors(self.obj.state_dict()))

    def load(self, r: Reader) -> bool:
        if not r.same_layout():
            return False
        stored = r.tensors(self.file)
        if stored is not None:
            try:
                state = rng_from_tensors(*stored)
            except (KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"{r.path}/{self.file}: not an RNG state ({type(e).__name__}: {e})") from None
        else:
            state = r.legacy_object(self.legacy_file)
            if state is None:
                return False
        self.obj.load_state_dict(state)
        return True


class ModelPart:
    """Parameters by global name, TP shards per (tp, pp), resharded to the current layout on load."""

    def __init__(self, model, ps: ParallelState):
        self.model, self.ps = model, ps

    def save(self, w: Writer) -> None:
        if self.ps.dp_rank == 0:   # DP replicas hold the same weights
            w.tensors(model_file(self.ps.tp_rank, self.ps.pp_rank),
                      {n: t.contiguous().cpu() for n, t in self.model.state_dict().items()})
        w.meta("vocab_size", self.model.vocab_size)
        w.meta("padded_vocab", self.model.padded_vocab)
        w.meta("params", self.model.layout())

    def load(self, r: Reader) -> bool:
        if r.meta["vocab_size"] != self.model.vocab_size:
            raise CheckpointError(f"checkpoint vocabulary {r.meta['vocab_size']} != tokenizer's "
                                  f"{self.model.vocab_size}")
        self.model.load_state_dict(_LocalTensors(r, self.model.layout(), self.model.vocab_size, self.ps))
        return True


class OptimizerPart:
    """Master weights and Adam moments in parameter space (name, element range of the flattened TP-local
    parameter), per (tp, pp, dp); resharded to the current layout on load."""

    KINDS = ("master", "exp_avg", "exp_avg_sq")

    def __init__(self, optimizer, model, ps: ParallelState):
        self.optimizer, self.model, self.ps = optimizer, model, ps

    def save(self, w: Writer) -> None:
        state = self.optimizer.state_dict()
        flat = {optim_key(n, kind, lo, hi): t.contiguous().cpu()
                for (n, lo, hi), kinds in state["pieces"].items() for kind, t in kinds.items()}
        w.tensors(optim_file(self.ps.tp_rank, self.ps.pp_rank, self.ps.dp_rank), flat, {"step": str(state["step"])})
        w.meta("layout", {"zero": self.optimizer.zero})

    def load(self, r: Reader) -> bool:
        if not r.shards.has_optimizer_state:   # a weights-only checkpoint (import-hf)
            return False
        local = _LocalTensors(r, self.model.layout(), self.model.vocab_size, self.ps, optimizer=True)
        pieces = _Pieces(local, self.KINDS, self.optimizer.piece_keys())
        self.optimizer.load_state_dict({"step": r.shards.step, "pieces": pieces})
        return True


class WeightsPart:
    """Full TP=1 tensors by name, written as one model shard (import-hf's weights-only checkpoint)."""

    def __init__(self, tensors: dict, params: dict, vocab_size: int, padded_vocab: int):
        self.tensors, self.params, self.vocab_size, self.padded_vocab = tensors, params, vocab_size, padded_vocab

    def save(self, w: Writer) -> None:
        w.tensors(model_file(0, 0), {k: v.contiguous() for k, v in self.tensors.items()})
        w.meta("vocab_size", self.vocab_size)
        w.meta("padded_vocab", self.padded_vocab)
        w.meta("params", self.params)

    def load(self, r: Reader) -> bool:
        raise CheckpointError("a weights-only part is written, not loaded")


# ----- resharding views -------------------------------------------------------------------------------------------
class _LocalTensors(Mapping):
    """{name: this rank's shard} of the checkpoint's parameters (or, with `optimizer`, {(name, kind): the
    flattened TP-local optimizer state}), assembled one at a time when asked for."""

    def __init__(self, r: Reader, layout: dict, vocab_size: int, ps: ParallelState, optimizer: bool = False):
        self.r, self.layout, self.vocab_size, self.ps, self.optimizer = r, layout, vocab_size, ps, optimizer

    def __getitem__(self, key):
        if self.optimizer:
            name, kind = key
            full = self.r.shards.optim_tensor(name, kind)
        else:
            name, kind = key, None
            full = self.r.shards.model_tensor(name)
        if full is None:
            if self.optimizer:
                return None
            raise CheckpointError(f"checkpoint {self.r.path} has no tensor for parameter {name}")
        local = to_local(full, self.layout[name], self.vocab_size, self.ps.tp, self.ps.tp_rank)
        if non_finite({name: local}):   # state from before checksums, or written non-finite: never trained on
            what = f"{name} ({kind})" if self.optimizer else name
            raise CheckpointError(f"checkpoint {self.r.path}: {what} holds non-finite values; refusing to load it")
        return local.reshape(-1) if self.optimizer else local

    def __iter__(self):
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)


class _Pieces(Mapping):
    """{(name, lo, hi): {kind: state}} for the optimizer's own pieces; a parameter's state is assembled once
    for all of its consecutive pieces."""

    def __init__(self, local: _LocalTensors, kinds: tuple, keys: list):
        self.local, self.kinds, self._keys = local, kinds, keys
        self._cached: tuple[Optional[str], dict] = (None, {})

    def __getitem__(self, key) -> dict:
        name, lo, hi = key
        if self._cached[0] != name:
            self._cached = (name, {k: self.local[(name, k)] for k in self.kinds})
        return {k: t[lo:hi] for k, t in self._cached[1].items() if t is not None}

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# ----- the parts of a training run --------------------------------------------------------------------------------
def training_parts(cfg: Config, ps: ParallelState, *, model, optimizer, scaler, tp_rng: TPRNG,
                   state: Stateful, tokenizer=None) -> dict:
    """Every part of a training checkpoint, in load order (the tokenizer check before the model's vocabulary
    check, the model before the optimizer's masters). `tokenizer` is None for mock data."""
    return {
        "config": ConfigPart(cfg.to_dict(), cfg.model),
        "tokenizer": TokenizerPart(tokenizer, writes_files=ps.rank == 0),
        "model": ModelPart(model, ps),
        "optimizer": OptimizerPart(optimizer, model, ps),
        "scaler": MetaPart(scaler, "scaler"),
        "rng": RNGPart(RNGState(tp_rng), ps),
        "train": MetaPart(state, None),
    }


def skipped_parts(c: CheckpointConfig) -> frozenset:
    """The parts a run does not load: --finetune keeps only the weights; --no-load-optim, --no-load-rng."""
    if c.finetune:
        return frozenset({"optimizer", "scaler", "rng", "train"})
    return frozenset(n for n, skip in (("optimizer", c.no_load_optim), ("rng", c.no_load_rng)) if skip)


class _NotStarted:
    """The train state of a run that has not started (a weights-only checkpoint)."""

    def state_dict(self) -> dict:
        return {"iteration": 0, "consumed_samples": 0, "tokens": 0, "data_state": None}


def weights_parts(tensors: dict, params: dict, config: dict, vocab_size: int, padded_vocab: int,
                  tokenizer=None) -> dict:
    """The parts of import-hf's checkpoint: full TP=1 weights at iteration 0, no optimizer state, and the
    HF directory's tokenizer when it has one."""
    return {"config": ConfigPart(config), "tokenizer": TokenizerPart(tokenizer),
            "model": WeightsPart(tensors, params, vocab_size, padded_vocab),
            "scaler": MetaPart(None, "scaler"),
            "train": MetaPart(_NotStarted(), None)}  # type: ignore[arg-type]  # written, never loaded
