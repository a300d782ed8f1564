"""Data-parallel gradient sync and the sharded (ZeRO-1) AdamW optimizer.

Design (Megatron-core's distributed optimizer, minus the indirection):
  * all parameters of a rank live in one contiguous buffer, and their fp32
    gradients in another (`main_grad` views), so reductions are a few big
    collectives instead of one per tensor;
  * the buffers are cut into buckets in backward order; in the last
    micro-batch a bucket's reduce-scatter (ZeRO-1) or all-reduce (ZeRO-0)
    starts as soon as its last gradient has been accumulated, overlapping
    communication with the rest of backward;
  * with ZeRO-1 each DP rank owns 1/DP of every bucket: it keeps fp32 master
    weights and Adam moments only for that shard, steps them with torch's
    fused AdamW, and all-gathers the updated parameters;
  * optimizer state is saved in parameter space (name, element range), so a
    checkpoint loads at any other DP/TP/PP layout.
ZeRO-0 is the same code with every rank owning the whole buffer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import OptimizerConfig
from ..parallel.state import ParallelState


@dataclass
class _Bucket:
    start: int                 # buffer offsets [start, end), end - start divisible by DP
    end: int
    params: list
    late: bool = False         # needs TP / embedding all-reduce before the DP reduction
    pending: int = 0
    handle: Optional[object] = None

    def shard(self, dp: int, dp_rank: int, zero: int) -> tuple[int, int]:
        if zero == 0:
            return self.start, self.end
        size = (self.end - self.start) // dp
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size


@dataclass
class _Piece:
    """The part of one parameter inside this rank's shard, in flat-parameter coordinates."""
    name: str
    param: nn.Parameter
    lo: int                    # element range within the flattened parameter
    hi: int
    offset: int                # buffer offset of element `lo`
    counted: bool              # contributes to the global grad norm on this rank


class DistributedOptimizer:
    def __init__(self, chunks: list[nn.Module], cfg: OptimizerConfig, ps: ParallelState, *, zero_stage: int = 1,
                 bucket_size_mb: float = 40.0, overlap: bool = True, grad_dtype: torch.dtype = torch.float32):
        self.cfg, self.ps, self.zero = cfg, ps, zero_stage if ps.dp > 1 else 0
        self.overlap = overlap and ps.dp > 1
        self.last_microbatch = True
        named = [(n, p) for c in chunks for n, p in c.named_parameters() if p.requires_grad]
        named.reverse()  # roughly the order in which backward produces gradients
        device, pdtype = ps.device, named[0][1].dtype
        self.names = {p: n for n, p in named}
        self.buckets = self._make_buckets(named, bucket_size_mb)
        total = self.buckets[-1].end if self.buckets else 0
        self.param_buffer = torch.zeros(total, dtype=pdtype, device=device)
        self.grad_buffer = torch.zeros(total, dtype=grad_dtype, device=device)
        self.offsets = {}
        for b in self.buckets:
            off = b.start
            for p in b.params:
                n = p.numel()
                self.param_buffer[off:off + n].copy_(p.detach().reshape(-1))
                p.data = self.param_buffer[off:off + n].view_as(p)
                p.main_grad = self.grad_buffer[off:off + n].view_as(p)
                self.offsets[p] = off
                p.register_post_accumulate_grad_hook(self._make_hook(b))
                off += n
        self._untouched = set()
        self.pieces = self._make_pieces()
        self.separate_master = pdtype != torch.float32
        groups = {True: [], False: []}
        self.masters = []
        for pc in self.pieces:
            view = self.param_buffer[pc.offset:pc.offset + pc.hi - pc.lo]
            master = nn.Parameter(view.detach().float().clone() if self.separate_master else view)
            master.grad = self.grad_buffer[pc.offset:pc.offset + pc.hi - pc.lo]
            self.masters.append(master)
            groups[pc.param.ndim > 1].append(master)  # no decay on biases and norms
        param_groups = [{"params": groups[True], "weight_decay": cfg.weight_decay},
                        {"params": groups[False], "weight_decay": 0.0}]
        param_groups = [g for g in param_groups if g["params"]]
        self.optimizer = torch.optim.AdamW(param_groups, lr=0.0, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_eps, fused=True)
        self.found_inf = torch.zeros(1, device=device)
        self.skipped = torch.zeros(1, device=device)  # non-finite steps since last read (no host sync)

    # ----- layout -------------------------------------------------------------------------------------------
    def _late(self, p) -> bool:
        return self._sequence_parallel(p) or self._tied_across_stages(p)

    def _sequence_parallel(self, p) -> bool:
        """A norm/bias that saw only this TP rank's tokens: summed over TP."""
        return getattr(p, "sequence_parallel", False) and self.ps.tp > 1

    def _tied_across_stages(self, p) -> bool:
        """The first stage's embedding and the last stage's copy of it (tied models only): summed over stages."""
        return self.ps.pp > 1 and (getattr(p, "shared_embedding", False) or hasattr(p, "tied_to"))

    def _make_buckets(self, named, bucket_size_mb: float) -> list[_Bucket]:
        elem = 4  # bucket size counted in fp32 gradient bytes
        cap = max(1, int(bucket_size_mb * 2 ** 20 / elem))
        align = self.ps.dp * 64 if self.zero else 1
        early = [p for _, p in named if not self._late(p)]
        late = [p for _, p in named if self._late(p)]
        buckets, start = [], 0
        for params, is_late in ((early, False), (late, True)):
            cur = []
            for i, p in enumerate(params):
                cur.append(p)
                if sum(q.numel() for q in cur) >= cap or i == len(params) - 1:
                    n = sum(q.numel() for q in cur)
                    end = start + math.ceil(n / align) * align
                    buckets.append(_Bucket(start, end, cur, late=is_late))
                    start, cur = end, []
        return buckets

    def _make_pieces(self) -> list[_Piece]:
        pieces = []
        for b in self.buckets:
            lo, hi = b.shard(self.ps.dp, self.ps.dp_rank, self.zero)
            for p in b.params:
                off, n = self.offsets[p], p.numel()
                s, e = max(lo, off), min(hi, off + n)
                if s < e:
                    replicated_copy = p.tp_split_dim is None and self.ps.tp_rank != 0
                    tied_copy = hasattr(p, "tied_to") and self.ps.pp > 1
                    pieces.append(_Piece(self.names[p], p, s - off, e - off, s, not (replicated_copy or tied_copy)))
        return pieces

    # ----- gradient sync ------------------------------------------------------------------------------------
    def _make_hook(self, bucket: _Bucket) -> Callable:
        def hook(p: torch.Tensor) -> None:
            if p in self._untouched:   # first gradient of the step: a copy, so zero_grad need not clear
                p.main_grad.copy_(p.grad)
                self._untouched.discard(p)
            else:
                p.main_grad.add_(p.grad)
            p.grad = None
            if self.overlap and self.last_microbatch and not bucket.late:
                bucket.pending -= 1
                if bucket.pending == 0:
                    self._reduce(bucket)
        return hook

    def _reduce(self, b: _Bucket) -> None:
        if self.ps.dp == 1:
            return
        grad = self.grad_buffer[b.start:b.end]
        grad.div_(self.ps.dp)
        if self.zero == 1 and grad.is_cuda:
            lo, hi = b.shard(self.ps.dp, self.ps.dp_rank, 1)
            b.handle = dist.reduce_scatter_tensor(self.grad_buffer[lo:hi], grad, group=self.ps.dp_group,
                                                  async_op=True)
        else:  # ZeRO-0, or gloo (no reduce-scatter): all-reduce, each rank reads its shard
            b.handle = dist.all_reduce(grad, group=self.ps.dp_group, async_op=True)

    def zero_grad(self) -> None:
        """Lazy: each parameter's first gradient overwrites its slot (one fp32 pass fewer per step);
        `finish_grad_sync` clears the slots of parameters that got no gradient. Padding stays zero."""
        self._untouched = set(self.offsets)
        for b in self.buckets:
            b.pending, b.handle = len(b.params), None

    def finish_grad_sync(self) -> None:
        """Wait for overlapped reductions, then do the ones that had to wait for the whole backward."""
        for p in self._untouched:
            p.main_grad.zero_()
        self._untouched = set()
        for b in self.buckets:
            if not b.late and b.handle is None:
                self._reduce(b)
        late = [p for b in self.buckets if b.late for p in b.params]
        sp = [p.main_grad for p in late if self._sequence_parallel(p)]
        if sp:  # sequence-parallel params saw only this rank's tokens
            _all_reduce_coalesced(sp, self.ps.tp_group)
        tied = [p.main_grad for p in late if self._tied_across_stages(p)]
        if tied and self.ps.embedding_group is not None:
            _all_reduce_coalesced(tied, self.ps.embedding_group)
        for b in self.buckets:
            if b.late:
                self._reduce(b)
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()

    # ----- step ---------------------------------------------------------------------------------------------
    def clip_and_step(self, lr: float, loss_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unscale, check for inf/nan everywhere, clip by the global norm, step; returns the norm (a tensor).

        The step is skipped on every rank if any rank saw a non-finite gradient, without a host sync.
        """
        grads = [m.grad for m in self.masters]
        self.found_inf.zero_()
        if loss_scale is not None and grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, (1.0 / loss_scale).float())
        counted = [m.grad for m, pc in zip(self.masters, self.pieces) if pc.counted]
        sq = torch.zeros(1, device=self.ps.device, dtype=torch.float32)
        if counted:
            sq = torch.stack(torch._foreach_norm(counted, 2.0)).float().pow(2).sum().reshape(1)
        self.found_inf = torch.maximum(self.found_inf, (~torch.isfinite(sq)).float())
        if self.ps.distributed:
            if self.zero == 1:   # shards span every rank: one all-reduce carries norm and overflow flag
                both = torch.cat([sq, self.found_inf])
                dist.all_reduce(both)
                sq, self.found_inf = both[:1], (both[1:] > 0).float()
            else:                # DP replicas hold the same grads: norm over the model-parallel group only,
                if self.ps.tp * self.ps.pp > 1:   # but an overflow on any rank skips the step everywhere
                    dist.all_reduce(sq, group=self.ps.mp_group)
                dist.all_reduce(self.found_inf)
                self.found_inf = (self.found_inf > 0).float()
        norm = sq.sqrt()
        self.found_inf = torch.maximum(self.found_inf, (~torch.isfinite(norm)).float())
        self.optimizer.grad_scale = None
        if self.cfg.clip_grad > 0 and grads:
            # Clip inside the fused AdamW kernel (it divides each gradient by `grad_scale`), saving a
            # read-modify-write pass over every fp32 gradient; a non-finite norm is skipped via found_inf.
            coef = (self.cfg.clip_grad / (norm + 1e-6)).clamp(max=1.0).reshape(())
            self.optimizer.grad_scale = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef)).reciprocal()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.found_inf = self.found_inf.reshape(())
        self.optimizer.step()
        self.skipped += self.found_inf
        self._publish()
        return norm

    def _publish(self) -> None:
        """Copy updated masters into the (bf16/fp16) parameters and share the shards across DP."""
        if self.separate_master and self.masters:
            views = [self.param_buffer[pc.offset:pc.offset + pc.hi - pc.lo] for pc in self.pieces]
            torch._foreach_copy_(views, [m.detach() for m in self.masters])
        if self.zero == 1:
            for b in self.buckets:
                lo, hi = b.shard(self.ps.dp, self.ps.dp_rank, 1)
                full = self.param_buffer[b.start:b.end]
                if full.is_cuda:
                    dist.all_gather_into_tensor(full, self.param_buffer[lo:hi].clone(), group=self.ps.dp_group)
                else:
                    parts = list(full.chunk(self.ps.dp))
                    dist.all_gather(parts, self.param_buffer[lo:hi].clone(), group=self.ps.dp_group)

    # ----- state --------------------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of optimizer-owned state on this rank: master weights (if separate) and Adam moments."""
        total = 0
        for m in self.masters:
            st = self.optimizer.state.get(m, {})
            total += sum(v.numel() * v.element_size() for k, v in st.items() if k != "step")
            total += m.numel() * m.element_size() if self.separate_master else 0
        return total

    def param_space_state(self) -> tuple[dict, int]:
        """{(name, lo, hi): {"master", "exp_avg", "exp_avg_sq"}} for this rank's pieces, and the step count."""
        out, step = {}, 0
        for m, pc in zip(self.masters, self.pieces):
            st = self.optimizer.state.get(m, {})
            if "step" in st:
                step = int(st["step"])
            out[(pc.name, pc.lo, pc.hi)] = {
                "master": m.detach(),
                "exp_avg": st.get("exp_avg", torch.zeros_like(m)).detach(),
                "exp_avg_sq": st.get("exp_avg_sq", torch.zeros_like(m)).detach()}
        return out, step

    def load_param_space_state(self, get: Callable[[str, str], Optional[torch.Tensor]], step: int) -> None:
        """`get(name, kind)` returns this rank's TP shard of a parameter's state, flattened (or None)."""
        for m, pc in zip(self.masters, self.pieces):
            master = get(pc.name, "master")
            if master is not None:
                m.data.copy_(master[pc.lo:pc.hi])
            avg, sq = get(pc.name, "exp_avg"), get(pc.name, "exp_avg_sq")
            if avg is None or sq is None:
                continue
            self.optimizer.state[m] = {
                "step": torch.tensor(float(step), dtype=torch.float32, device=m.device),
                "exp_avg": avg[pc.lo:pc.hi].to(m.device, torch.float32).clone(),
                "exp_avg_sq": sq[pc.lo:pc.hi].to(m.device, torch.float32).clone()}
        self._publish()

    def reload_masters_from_params(self) -> None:
        """After loading model weights without optimizer state: masters follow the parameters."""
        if self.separate_master:
            for m, pc in zip(self.masters, self.pieces):
                m.data.copy_(self.param_buffer[pc.offset:pc.offset + pc.hi - pc.lo].float())


def _all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()
