"""The AdamW optimizer of ZeRO stage 0 or 1 over a GradBuffer's shard: fp32 masters, clip, step, all-gather, state.

Megatron-core's distributed optimizer, minus the indirection:
  * each DP rank owns 1/DP of every gradient bucket (`GradBuffer.shard`); it keeps fp32 master weights and
    Adam moments only for the parameter ranges inside that shard (`GradBuffer.local_ranges`), steps them
    in one flat AdamW pass that also writes the parameters (adamw.py), and all-gathers them bucket by bucket;
  * the global gradient norm and the non-finite check need one all-reduce, and a non-finite gradient on
    any rank skips the step on every rank, without a host sync;
  * the state is kept in parameter space (name, element range), so a checkpoint loads at any other
    DP/TP/PP layout.
ZeRO-0 is the same class with every rank owning the whole buffer (a shard of one), hence its name
`ZeroOptimizer`, for both stages. The gradient reduction itself belongs to
the GradBuffer (grad_buffer.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import OptimizerConfig
from ..parallel.param_meta import param_meta
from ..parallel.precision import upcast
from ..parallel.state import ParallelState
from .adamw import FlatAdamW, Piece
from .grad_buffer import GradBuffer


def describe_zero(stage: int, dp: int) -> str:
    """ZeRO as configured and what it means at this DP size (the run header, checkpoint-info): at DP 1 ZeRO-1
    has nothing to shard, which a bare "ZeRO-0" (what the optimizer then runs) would hide."""
    if stage == 1:
        return f"ZeRO-1 (optimizer state sharded over DP {dp})" if dp > 1 else "ZeRO-1 (no sharding at DP 1)"
    return "ZeRO-0 (optimizer state replicated over DP)" if dp > 1 else "ZeRO-0 (no data parallelism at DP 1)"


# ----- torch entry points beyond the plain public API, kept in this one place ---------------------------------
def _norms(grads: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[len(grads)] in `dtype` (fp32 or fp64, the gradient buffer's): each gradient's L2 norm (what
    clip_grad_norm_ sums), one multi-tensor pass computing in `dtype` (also for half gradients read directly,
    buckets.direct_gradients); a non-finite element makes its tensor's norm non-finite."""
    return upcast(torch.stack(torch._foreach_norm(grads, 2.0, dtype=dtype)))


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Piece:
    """A parameter range in this rank's shard (see GradBuffer.LocalRange) and whether its gradient counts
    toward the global norm here (replicated TP copies and tied stage copies count once, elsewhere)."""
    name: str
    param: nn.Parameter
    lo: int
    hi: int
    offset: int
    counted: bool


class OptimizerStep(NamedTuple):
    grad_norm: torch.Tensor    # [1], global, before clipping (non-finite if any gradient was)
    found_inf: torch.Tensor    # [1], 1.0 if the step was skipped on every rank because of it


class ZeroOptimizer:
    """AdamW for ZeRO stage 0 (`buffer.zero == 0`: every DP rank steps the whole model) or stage 1 (each DP rank
    steps its shard of the buffer, then all-gathers the updated parameters)."""

    def __init__(self, buffer: GradBuffer, cfg: OptimizerConfig, ps: ParallelState):
        self.buffer, self.cfg, self.ps, self.zero = buffer, cfg, ps, buffer.zero
        self._ranges = list(buffer.local_ranges())
        self.pieces = [_Piece(r.name, r.param, r.lo, r.hi, r.offset, counted=not (
            (param_meta(r.param).split_dim is None and ps.tp_rank != 0)
            or (param_meta(r.param).tied_to is not None and ps.pp > 1)))
            for r in self._ranges]
        # indices of the pieces whose gradient counts toward the global norm here
        counted = [i for i, pc in enumerate(self.pieces) if pc.counted]
        self.counted = torch.tensor(counted, dtype=torch.long, device=ps.device) if counted else None
        self.separate_master = buffer.param_dtype not in (torch.float32, torch.float64)   # half params
        flat, pieces = 0, []
        for pc in self.pieces:
            pieces.append(Piece(pc.offset, flat, pc.hi - pc.lo, decay=pc.param.ndim > 1))   # none on biases, norms
            flat += pc.hi - pc.lo
        # AdamW (decoupled weight decay), or Adam's L2 penalty where a run continues one that used it
        self.adamw = FlatAdamW(pieces, buffer.param_data, torch.float32 if self.separate_master else buffer.param_dtype,
                               self.separate_master, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps,
                               cfg.weight_decay, cfg.decoupled_weight_decay)
        self.masters: list[nn.Parameter] = []
        for i in range(len(self.pieces)):
            master = nn.Parameter(self.adamw.master_view(i))   # a view: the flat buffer (or the parameter) itself
            if not buffer.direct:
                master.grad = buffer.gradient(self._ranges[i])
            self.masters.append(master)
        # fixed for the optimizer's life (the buffers are never reallocated; masters change in place), so the
        # step builds no per-tensor lists: at small shapes the step is host-bound. Direct gradients are new
        # tensors every step, listed by `_step_grads`.
        self._grads: list[torch.Tensor] = [m.grad for m in self.masters if m.grad is not None]
        self._publish_pairs = ([self._param_view(pc) for pc in self.pieces], [m.detach() for m in self.masters])

    def _param_view(self, pc: _Piece) -> torch.Tensor:
        return self.buffer.param_data[pc.offset:pc.offset + pc.hi - pc.lo]

    # ----- step ---------------------------------------------------------------------------------------------
    def step(self, lr: float, loss_scale: Optional[torch.Tensor] = None) -> OptimizerStep:
        """Check for inf/nan everywhere, clip by the global norm, step (unscaling inside the kernel), all-gather.

        Call after `GradBuffer.finish_grad_sync`. The step is skipped on every rank if any rank saw a
        non-finite gradient, without a host sync."""
        grads = self._step_grads()
        dtype = self.buffer.grad_data.dtype   # fp32 (fp64 for fp64 parameters), also when direct
        sq = torch.zeros(1, device=self.ps.device, dtype=dtype)
        found_inf = torch.zeros(1, device=self.ps.device, dtype=torch.float32)
        if grads:   # fp16: still multiplied by the loss scale, unscaled below and inside the AdamW kernel
            norms = _norms(grads, dtype)
            found_inf = (~torch.isfinite(norms).all()).float().reshape(1)   # any gradient here, counted or not
            if self.counted is not None:
                sq = norms[self.counted].pow(2).sum().reshape(1)
        if self.ps.distributed:
            if self.zero == 1:   # shards span every rank: one all-reduce carries norm and overflow flag
                both = torch.cat([sq, found_inf.to(sq.dtype)])
                dist.all_reduce(both)
                sq, found_inf = both[:1], (both[1:] > 0).float()
            else:                # DP replicas hold the same grads: norm over the model-parallel group only,
                if self.ps.tp * self.ps.pp > 1:   # but an overflow on any rank skips the step everywhere
                    dist.all_reduce(sq, group=self.ps.mp_group)
                dist.all_reduce(found_inf)
                found_inf = (found_inf > 0).float()
        norm = sq.sqrt()
        if loss_scale is not None:
            norm = norm / loss_scale.to(norm.dtype)   # exact for Megatron's power-of-two scales
        found_inf = torch.maximum(found_inf, (~torch.isfinite(norm)).float())
        # The AdamW step divides each gradient by `grad_scale`: the loss scale and the clip ride in it, saving
        # a read-modify-write pass over every fp32 gradient for each; a non-finite norm skips the step via
        # found_inf.
        grad_scale = None
        if self.cfg.clip_grad > 0 and grads:
            coef = (self.cfg.clip_grad / (norm + 1e-6)).clamp(max=1.0).reshape(())
            grad_scale = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef)).reciprocal().float()
        if loss_scale is not None and grads:
            scale = loss_scale.float().reshape(())
            grad_scale = scale if grad_scale is None else grad_scale * scale
        # the step writes the shard's (bf16/fp16) parameters itself
        self.adamw.step(grads if self.buffer.direct else self.buffer.grad_data, lr, grad_scale,
                        found_inf.reshape(()))
        self.buffer.release()
        self._all_gather()
        return OptimizerStep(norm, found_inf)

    def _step_grads(self) -> list[torch.Tensor]:
        """Each piece's flat gradient: the buffer views fixed at construction, or this step's direct ones."""
        return [self.buffer.gradient(r) for r in self._ranges] if self.buffer.direct else self._grads

    def _publish(self) -> None:
        """Copy the masters into the (bf16/fp16) parameters and share the shards across DP (after loading)."""
        if self.separate_master and self.masters:
            torch._foreach_copy_(*self._publish_pairs)
        self._all_gather()

    def _all_gather(self) -> None:
        """ZeRO-1: every DP rank's updated shard to every rank."""
        if self.zero == 1:
            data = self.buffer.param_data
            for b in self.buffer.buckets:
                lo, hi = self.buffer.shard(b)
                full = data[b.start:b.end]
                if full.is_cuda:
                    dist.all_gather_into_tensor(full, data[lo:hi].clone(), group=self.ps.dp_group)
                else:
                    parts = list(full.chunk(self.ps.dp))
                    dist.all_gather(parts, data[lo:hi].clone(), group=self.ps.dp_group)

    # ----- state --------------------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of optimizer-owned state on this rank: master weights (if separate) and Adam moments."""
        return self.adamw.state_bytes()

    def piece_keys(self) -> list[tuple[str, int, int]]:
        """(name, lo, hi) of every parameter range whose state this rank holds, as in `state_dict`."""
        return [(pc.name, pc.lo, pc.hi) for pc in self.pieces]

    def state_dict(self) -> dict:
        """{"step": Adam's step count, "pieces": {(name, lo, hi): {"master", "exp_avg", "exp_avg_sq"}}}:
        this rank's state by parameter name and element range of the flattened (TP-local) parameter."""
        steps = self.adamw.steps
        pieces = {}
        for i, (m, pc) in enumerate(zip(self.masters, self.pieces)):
            avg, sq = self.adamw.moments(i)
            pieces[(pc.name, pc.lo, pc.hi)] = {"master": m.detach(), "exp_avg": avg, "exp_avg_sq": sq}
        return {"step": int(steps.max()) if steps.numel() else 0, "pieces": pieces}

    def load_state_dict(self, state: dict) -> None:
        """`state` as `state_dict` returns it, for this rank's pieces; a kind missing from a piece keeps what
        is there (no Adam moments: they start at zero with the piece's first step). Then the parameters follow."""
        for i, (m, pc) in enumerate(zip(self.masters, self.pieces)):
            kinds = state["pieces"].get((pc.name, pc.lo, pc.hi), {})
            if kinds.get("master") is not None:
                m.data.copy_(kinds["master"])
            avg, sq = kinds.get("exp_avg"), kinds.get("exp_avg_sq")
            if avg is None or sq is None:
                continue
            for have, new in zip(self.adamw.moments(i), (avg, sq)):
                have.copy_(new)
            self.adamw.steps[i] = float(state["step"])
        self._publish()

    def reload_masters_from_params(self) -> None:
        """After loading model weights without optimizer state: masters follow the parameters."""
        if self.separate_master:
            for m, pc in zip(self.masters, self.pieces):
                m.data.copy_(self._param_view(pc).float())
