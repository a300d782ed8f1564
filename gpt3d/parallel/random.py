"""Dropout randomness that follows the tensor-parallel split.

Activations replicated across TP ranks (the residual stream without sequence
parallelism) must see the *same* dropout mask on every TP rank, so they use the
default generator, seeded identically on TP peers. Activations that are split
(attention heads, sequence-parallel shards) must see *different* masks, so they
draw from a second, per-TP-rank state entered with `tp_rng(ps)`. `RNGState` bundles every stream of a
rank for an exact resume, as plain tensors and JSON-able numbers (`to_tensors` / `from_tensors`): a
checkpoint stores them as safetensors, never as a pickle.
"""
from __future__ import annotations

import contextlib
import json
import random

import numpy as np
import torch
import torch.utils.checkpoint

from .state import ParallelState

_TP_SEED_OFFSET = 2718


class TPRNG:
    """Holds the TP-split generator state for CPU and (if used) the current CUDA device."""

    def __init__(self, seed: int, ps: ParallelState):
        self.device = ps.device
        self.seed = seed + _TP_SEED_OFFSET + ps.tp_rank
        saved, cpu = _get(self.device), torch.get_rng_state()
        torch.manual_seed(self.seed)
        self.state = _get(self.device)
        _set(self.device, saved)
        torch.set_rng_state(cpu)

    @contextlib.contextmanager
    def fork(self):
        outer = _get(self.device)
        _set(self.device, self.state)
        try:
            yield
        finally:
            self.state = _get(self.device)
            _set(self.device, outer)

    def state_dict(self) -> dict:
        return {"state": self.state}

    def load_state_dict(self, d: dict) -> None:
        self.state = d["state"]


def _get(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set(device: torch.device, state) -> None:
    if state is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def seed_everything(seed: int, ps: ParallelState) -> TPRNG:
    """Default generators: same on TP peers, offset per pipeline stage (Megatron's rule)."""
    s = seed + 100 * ps.pp_rank
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)
    return TPRNG(s, ps)   # offset per stage too: stages must not share TP dropout masks either


class RNGState:
    """Every random stream of this rank (Python, numpy, torch, CUDA, the TP-split stream), as one stateful
    object: what an exact resume restores."""

    def __init__(self, tp_rng: TPRNG):
        self.tp_rng = tp_rng

    def state_dict(self) -> dict:
        d = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tp": self.tp_rng.state_dict()}
        if torch.cuda.is_available() and self.tp_rng.device.type == "cuda":
            d["cuda"] = torch.cuda.get_rng_state(self.tp_rng.device)
        return d

    def load_state_dict(self, d: dict) -> None:
        random.setstate(d["python"])
        np.random.set_state(d["numpy"])
        torch.set_rng_state(d["torch"])
        if "cuda" in d and self.tp_rng.device.type == "cuda":
            torch.cuda.set_rng_state(d["cuda"], self.tp_rng.device)
        self.tp_rng.load_state_dict(d["tp"])


def to_tensors(d: dict) -> tuple[dict, dict]:
    """An RNGState.state_dict() as ({name: integer tensor}, {name: str}), for a safetensors file."""
    version, mt, gauss = d["python"]
    name, key, pos, has_gauss, cached = d["numpy"]
    tensors = {"python": torch.tensor(list(mt), dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(key, dtype=np.int64)),
               "torch": d["torch"], "tp": d["tp"]["state"]}
    if "cuda" in d:
        tensors["cuda"] = d["cuda"]
    numbers = {"python_version": version, "python_gauss_next": gauss, "numpy_generator": name, "numpy_pos": pos,
               "numpy_has_gauss": has_gauss, "numpy_cached_gaussian": cached}
    return tensors, {"rng": json.dumps(numbers)}


def from_tensors(tensors: dict, metadata: dict) -> dict:
    """The RNGState.state_dict() that `to_tensors` stored (ValueError/KeyError/TypeError if it is not one)."""
    n = json.loads(metadata["rng"])
    mt = tuple(int(x) for x in tensors["python"].tolist())
    key = tensors["numpy"].numpy().astype(np.uint32)
    gauss, cached = n["python_gauss_next"], n["numpy_cached_gaussian"]
    if not (isinstance(n["python_version"], int) and isinstance(n["numpy_pos"], int)
            and isinstance(n["numpy_has_gauss"], int) and (gauss is None or isinstance(gauss, float))
            and isinstance(cached, (int, float)) and isinstance(n["numpy_generator"], str)):
        raise ValueError("RNG numbers of the wrong type")
    d = {"python": (n["python_version"], mt, gauss),
         "numpy": (n["numpy_generator"], key, n["numpy_pos"], n["numpy_has_gauss"], float(cached)),
         "torch": tensors["torch"].to(torch.uint8), "tp": {"state": tensors["tp"].to(torch.uint8)}}
    if "cuda" in tensors:
        d["cuda"] = tensors["cuda"].to(torch.uint8)
    return d


def checkpoint(fn, tp_rng: TPRNG, *args, tp_stream: bool = True):
    """Non-reentrant activation checkpoint that also replays the TP-split dropout stream.

    torch.utils.checkpoint restores the default generators on recompute; the TP
    generator lives outside them, so the recompute restores its state by hand and
    puts the advanced state back afterwards (1F1B interleaves forwards with it).
    That bookkeeping mutates Python state, which torch.compile cannot trace inside
    a checkpoint: it breaks the graph there and runs the region unfused (measured
    on an H200: +37% step time with full recompute at 125M instead of ~+23%). So a
    caller whose region draws nothing from the TP stream (`tp_stream=False`: no
    attention dropout, no sequence-parallel residual dropout) gets torch's own
    checkpoint, which compiles into the surrounding graph.
    """
    if not tp_stream:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    start = tp_rng.state
    calls = [0]

    def run(*a):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*a)
        outer, tp_rng.state = tp_rng.state, start
        try:
            return fn(*a)
        finally:
            tp_rng.state = outer

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
