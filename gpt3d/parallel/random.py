"""Dropout randomness that follows the tensor-parallel split, drawn inside the compiled graph.

Activations split across TP ranks (attention heads, sequence-parallel shards of the residual stream) must see
*different* masks on TP peers; activations replicated on every TP rank (the residual stream and the embedding
output without sequence parallelism) must see the *same* mask. Two streams serve them:

- **split activations: the default generators**, seeded per TP rank (`seed_everything`). Attention dropout
  therefore stays inside the fused attention kernel (SDPA's `dropout_p`, or flash-attn's), which draws from
  the default CUDA generator, and sequence-parallel residual dropout is plain `F.dropout`. torch.compile traces
  both (Inductor generates the random numbers in its own kernels from seeds drawn off the default generator),
  and `torch.utils.checkpoint` replays them on recompute (eager: it restores the default generators; compiled:
  AOTAutograd keeps a random op's output, or, inside a checkpointed region, saves the generator state the op
  ran with and recomputes it from that state: SDPA's fused kernels are tagged as seeded random ops).
- **replicated activations: a counter-based hash** (`replicated_dropout`): keep element i iff
  hash(seed, draw, site, i) >= p, computed with plain integer tensor ops that Inductor fuses into the
  neighbouring elementwise kernel. `draw` is a device tensor taken from a counter once per model-chunk forward
  (`TPRNG.next_draw`) and handed to every layer as an argument, `site` a per-layer buffer (so one compiled
  layer body serves every layer). The mask is a pure function of tensors the region already holds, so a
  recompute, eager or compiled, rebuilds the very same mask, and a compiled backward may recompute it instead
  of keeping it. TP peers run the same forwards, so their counters, and their masks, agree.

Why not the alternatives: forking a second generator's state in Python (`get_rng_state`/`set_rng_state`, what
gpt3d did before) breaks the Dynamo graph at every dropout site; `torch.Generator` arguments and functionalized
RNG ops (rngprims.philox_rand) are not traceable on every device gpt3d runs on (CPU among them); passing
per-layer seed/offset tensors for every site and every kernel (option b) would still need SDPA to take an
explicit generator, which it does not: the default generator is the only one a fused attention kernel reads.

The hash is Chris Wellons' "lowbias32" integer hash (two rounds per element). Element values are 32-bit
patterns held in int32 tensors: multiplication wraps modulo 2^32 and the right shifts are masked to be logical,
so every device and backend computes the same bits as unsigned 32-bit arithmetic would.

`RNGState` bundles every stream of a rank (Python, numpy, torch and CUDA default generators, the draw counter)
for an exact resume, as plain tensors and JSON-able numbers (`to_tensors` / `from_tensors`): a checkpoint
stores them as safetensors, never as a pickle.
"""
from __future__ import annotations

import json
import random
from typing import Union

import numpy as np
import torch
import torch.utils.checkpoint

from .state import ParallelState

_TP_SEED_OFFSET = 2718          # the default generator's seed on TP rank r: seed + 100 * pp_rank + 2718 + r
_M32 = 0xFFFFFFFF
EMBEDDING_SITE = 0x7FFF0000     # the embedding output's dropout site (layer l's sites: 4 * l + 0 and 4 * l + 1)


class TPRNG:
    """The replicated-dropout stream of one rank: a seed (the same on TP peers) and a device counter of draws.

    Each training forward of a model chunk that uses replicated dropout takes one draw (`next_draw`): the
    counter tensor itself, replaced (not incremented in place) by a new one, so a later recompute of that
    micro-batch, eager or in a compiled backward, sees the value its forward saw."""

    def __init__(self, seed: int, ps: ParallelState):
        self.device = ps.device
        self.seed = seed & _M32
        self.counter = torch.zeros((), dtype=torch.int64, device=ps.device)

    def next_draw(self) -> torch.Tensor:
        # never in place: a compiled backward may recompute from the draw, so the tensor must keep its value
        draw, self.counter = self.counter, self.counter + 1
        return draw

    def state_dict(self) -> dict:
        return {"seed": self.seed, "counter": int(self.counter)}

    def load_state_dict(self, d: dict) -> None:
        # checkpoints written before the counter existed hold {"state": ...} of a generator: nothing to restore
        if "counter" in d:
            self.counter = torch.tensor(int(d["counter"]), dtype=torch.int64, device=self.device)


def seed_everything(seed: int, ps: ParallelState) -> TPRNG:
    """Python and numpy: one seed per pipeline stage (Megatron's rule), the same on TP peers. The default torch
    (and CUDA) generators: that seed plus a per-TP-rank offset, since they serve split activations. Returns the
    replicated-dropout stream, seeded per stage and the same on TP peers."""
    s = seed + 100 * ps.pp_rank
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s + _TP_SEED_OFFSET + ps.tp_rank)
    return TPRNG(s, ps)


class RNGState:
    """Every random stream of this rank (Python, numpy, torch, CUDA, the replicated-dropout counter), as one
    stateful object: what an exact resume restores."""

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
               "torch": d["torch"]}
    if "cuda" in d:
        tensors["cuda"] = d["cuda"]
    numbers = {"python_version": version, "python_gauss_next": gauss, "numpy_generator": name, "numpy_pos": pos,
               "numpy_has_gauss": has_gauss, "numpy_cached_gaussian": cached,
               "tp_seed": d["tp"]["seed"], "tp_counter": d["tp"]["counter"]}
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
    tp = {k: n[f"tp_{k}"] for k in ("seed", "counter") if f"tp_{k}" in n}
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 63 for v in tp.values()):
        raise ValueError("RNG counter of the wrong type")
    d = {"python": (n["python_version"], mt, gauss),
         "numpy": (n["numpy_generator"], key, n["numpy_pos"], n["numpy_has_gauss"], float(cached)),
         "torch": tensors["torch"].to(torch.uint8), "tp": tp}
    if "cuda" in tensors:
        d["cuda"] = tensors["cuda"].to(torch.uint8)
    return d


def recompute(fn, *args):
    """Activation checkpoint (non-reentrant) of `fn(*args)`, eager or inside a compiled graph.

    Dropout replays exactly without any bookkeeping here: torch's checkpoint restores the default generators
    (split activations' dropout) before recomputing, and replicated dropout is a function of `args` (its draw
    tensor) and of the module's buffers. Nothing in the region mutates Python state, so Dynamo traces it into
    the surrounding graph (tests/unit/test_recompute.py counts the graph breaks)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


# ----- the replicated-dropout hash ----------------------------------------------------------------------------
def _mix64(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2^32): every product stays below 2^63."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors holding 32-bit patterns: wrapping products, logical (masked) shifts."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x21F0AAAD
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x735A2D97
    return x ^ ((x >> 15) & 0x1FFFF)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 tensors with the same 32 bits."""
    return ((x ^ 0x80000000) - 0x80000000).to(torch.int32)


def _site_keys(seed: int, draw: torch.Tensor, site: Union[torch.Tensor, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys (int32 scalars) for one dropout site of one draw."""
    k = _mix64(_mix64(_mix64(draw & _M32) ^ (seed & _M32) ^ (draw >> 32)) ^ (site & _M32))
    return _as_int32(k), _as_int32(_mix64(k ^ 0x9E3779B9))


def hash_index(i: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """mix(mix(lo ^ k1) ^ hi ^ k2) of element indices `i` (int32 below 2^31, else int64: lo and hi are the
    index's 32-bit halves), as int32 bit patterns uniform over all 2^32 values."""
    if i.dtype == torch.int64:
        return _mix32(_mix32(_as_int32(i & _M32) ^ k1) ^ _as_int32(i >> 32) ^ k2)
    return _mix32(_mix32(i ^ k1) ^ k2)


def _keep_mask(shape: torch.Size, device: torch.device, k1: torch.Tensor, k2: torch.Tensor,
               threshold: int) -> torch.Tensor:
    """Bool mask of `shape`: element i kept iff its hash >= threshold (as signed 32-bit numbers)."""
    n = shape.numel()
    i = torch.arange(n, dtype=torch.int32 if n < 2 ** 31 else torch.int64, device=device)
    return (hash_index(i, k1, k2) >= threshold).view(shape)


def drop_threshold(p: float) -> int:
    """Dropping iff the signed 32-bit hash, uniform over [-2^31, 2^31), is below this drops a fraction p."""
    return round(p * 2 ** 32) - 2 ** 31


_compiled_keep_mask = None


def keep_mask(shape: torch.Size, device: torch.device, p: float, seed: int, draw: torch.Tensor,
              site: Union[torch.Tensor, int]) -> torch.Tensor:
    """The replicated-dropout mask (True: keep) of one site and draw: the same on every rank that passes the
    same seed, draw and site. Eager on a GPU it runs as one compiled kernel (a chain of integer ops otherwise);
    inside a compiled region it is traced and fused with its neighbours."""
    global _compiled_keep_mask
    k1, k2 = _site_keys(seed, draw, site)
    if device.type == "cuda" and not torch.compiler.is_compiling():
        if _compiled_keep_mask is None:
            _compiled_keep_mask = torch.compile(_keep_mask, dynamic=False)
        return _compiled_keep_mask(shape, device, k1, k2, drop_threshold(p))
    return _keep_mask(shape, device, k1, k2, drop_threshold(p))


class _MaskedScale(torch.autograd.Function):
    """y = x * scale where `keep`, else 0; backward keeps only the bool mask (as CUDA's native dropout does)."""

    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, g * ctx.scale, 0.0), None, None


def replicated_dropout(x: torch.Tensor, p: float, seed: int, draw: torch.Tensor,
                       site: Union[torch.Tensor, int]) -> torch.Tensor:
    """Inverted dropout of an activation that is replicated on TP peers: identical masks on every peer, and on
    every recompute of the same draw."""
    return _MaskedScale.apply(x, keep_mask(x.shape, x.device, p, seed, draw, site), 1.0 / (1.0 - p))


def split_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout of an activation split across TP ranks (a sequence-parallel shard): the default generator,
    seeded per TP rank, gives each peer its own mask."""
    return torch.nn.functional.dropout(x, p, True)

