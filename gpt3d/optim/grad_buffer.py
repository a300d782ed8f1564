"""Data-parallel gradient sync: contiguous bucketed buffers, reduced across DP while backward runs.

Megatron-core's DDP buffer, minus the indirection:
  * all parameters of a rank live in one contiguous buffer (`param_data`; each parameter's `.data` becomes
    a view of it, so the optimizer can all-gather whole buckets) and their fp32 gradients in another
    (`grad_data`; `p.main_grad` views), so reductions are a few big collectives instead of one per tensor;
  * the buffers are cut into buckets in backward order; outside `no_sync()` (the last micro-batch) a
    bucket's reduce-scatter (ZeRO-1) or all-reduce (ZeRO-0) starts as soon as its last gradient has been
    accumulated, overlapping communication with the rest of backward;
  * gradients that first need a TP or embedding all-reduce (sequence-parallel norms, tied embeddings
    across stages) sit in "late" buckets, reduced by `finish_grad_sync` after backward.
With ZeRO-1 each DP rank owns 1/DP of every bucket (`shard`): after `finish_grad_sync` that part holds the
DP-averaged gradient. What to do with it (clip, step, all-gather) is the ZeRO optimizer's job (zero.py).

Where nothing adds to or reduces a gradient (buckets.direct_gradients: DP 1, one micro-batch, no late
reduction) there is no fp32 buffer: the hooks keep autograd's gradients as they are (`direct`), and the
optimizer reads them from there (`gradient`). Weights whose backward adds into `main_grad` itself
(model/grad_accumulation.py) hand their hooks a placeholder, which is not added; the buffer is then zeroed once a
step instead of each slot being overwritten by its first gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model.grad_accumulation import accumulates_in_backward
from ..parallel.param_meta import param_meta
from ..parallel.state import ParallelState
from .accumulate import accumulate
from .buckets import bucket_layout, direct_gradients, effective_zero_stage, late_reductions, local_pieces, shard_range


@dataclass
class Bucket:
    start: int                 # buffer offsets [start, end), end - start divisible by DP at ZeRO-1
    end: int
    params: list
    late: bool = False         # needs TP / embedding all-reduce before the DP reduction
    pending: int = 0           # gradients still to come in this step's synced backward
    handle: Optional[dist.Work] = None   # the bucket's asynchronous reduction, waited on in finish_grad_sync


@dataclass
class LocalRange:
    """The part of one parameter inside this rank's shard, in flat-parameter coordinates."""
    name: str
    param: nn.Parameter
    lo: int                    # element range within the flattened parameter
    hi: int
    offset: int                # buffer offset of element `lo`


class GradBuffer:
    def __init__(self, chunks: Iterable[nn.Module], ps: ParallelState, *, zero_stage: int = 1,
                 bucket_size_mb: float = 40.0, overlap: bool = True, grad_dtype: Optional[torch.dtype] = None,
                 micro_batches: Optional[int] = None):
        """`micro_batches`: per step, where known (the trainer); with one, DP 1 and no late reduction the
        gradients are used where autograd made them (`direct`)."""
        self.ps, self.zero = ps, effective_zero_stage(zero_stage, ps.dp)
        self.overlap = overlap and ps.dp > 1
        self._sync = True
        named = [(n, p) for c in chunks for n, p in c.named_parameters() if p.requires_grad]
        named.reverse()  # roughly the order in which backward produces gradients
        self.param_dtype = named[0][1].dtype
        self._names = {p: n for n, p in named}
        params = [p for _, p in reversed(named)]   # registration order, as bucket_layout takes it
        self._numels = [p.numel() for p in params]
        late = [self._late(p) for p in params]
        self._tp_late: list = [p for p, (tp_sum, _) in zip(params, late) if tp_sum]         # summed over TP first
        self._stage_late: list = [p for p, (_, stage_sum) in zip(params, late) if stage_sum]  # over the tied stages
        self.layout = bucket_layout(self._numels, [any(k) for k in late], bucket_size_mb=bucket_size_mb,
                                    dp=ps.dp, zero=self.zero)
        self._params = params
        self.buckets = [Bucket(s.start, s.end, [params[i] for i in s.members], late=s.late) for s in self.layout]
        total = self.buckets[-1].end if self.buckets else 0
        self.direct = direct_gradients(ps.dp, micro_batches, [any(k) for k in late])
        self._kept: dict[torch.Tensor, torch.Tensor] = {}   # direct: each parameter's gradient of this step
        self.param_data = torch.zeros(total, dtype=self.param_dtype, device=ps.device)
        # fp32 gradients for half parameters (fp64 for fp64 ones, see parallel/precision.py); none when direct
        grad_dtype = grad_dtype or torch.promote_types(self.param_dtype, torch.float32)
        self.grad_data = torch.zeros(0 if self.direct else total, dtype=grad_dtype, device=ps.device)
        self._offsets = {}
        for spec, b in zip(self.layout, self.buckets):
            for p, off in zip(b.params, spec.offsets):
                n = p.numel()
                self.param_data[off:off + n].copy_(p.detach().reshape(-1))
                p.data = self.param_data[off:off + n].view_as(p)
                if not self.direct:
                    p.main_grad = _slot(self.grad_data, off, p.shape)
                elif hasattr(p, "main_grad"):   # an earlier buffer's: no backward may add into it now
                    del p.main_grad
                self._offsets[p] = off
                p.register_post_accumulate_grad_hook(self._keep if self.direct else self._make_hook(b))
        self._untouched: set[torch.Tensor] = set()

    # ----- layout -------------------------------------------------------------------------------------------
    def _late(self, p) -> tuple[bool, bool]:
        """(summed over TP, summed over the tied stages) before DP: buckets.late_reductions for `p`."""
        meta = param_meta(p)
        return late_reductions(meta.sequence_parallel, meta.tied_across_stages, self.ps.tp, self.ps.pp)

    def shard(self, b: Bucket) -> tuple[int, int]:
        """This DP rank's buffer range of bucket `b` (the whole bucket at ZeRO-0)."""
        return shard_range(b.start, b.end, self.ps.dp, self.ps.dp_rank, self.zero)

    def local_ranges(self) -> Iterator[LocalRange]:
        """Every parameter range inside this rank's shards, bucket by bucket."""
        for i, lo, hi, off in local_pieces(self.layout, self._numels, self.ps.dp, self.ps.dp_rank, self.zero):
            p = self._params[i]
            yield LocalRange(self._names[p], p, lo, hi, off)

    def nbytes(self) -> int:
        """Bytes of the gradient buffer on this rank (bucket padding included). The parameters live in
        `param_data` (`param_nbytes`), which replaces the model's own storage rather than adding to it."""
        return self.grad_data.numel() * self.grad_data.element_size()

    def param_nbytes(self) -> int:
        return self.param_data.numel() * self.param_data.element_size()

    def gradient(self, r: LocalRange) -> torch.Tensor:
        """The flat gradient of range `r` (from `local_ranges`) after `finish_grad_sync`: a view of the buffer,
        or (direct) of the gradient autograd made, which lives until the next `zero_grad` or `release`."""
        if self.direct:
            return self._kept[r.param].view(-1)[r.lo:r.hi]
        return self.grad_data[r.offset:r.offset + r.hi - r.lo]

    def release(self) -> None:
        """Direct: drop this step's gradients once the optimizer has used them (their memory goes back to the
        allocator before the next forward)."""
        self._kept = {}

    def fused(self) -> list[torch.Tensor]:
        """The parameters whose backward adds into `main_grad` itself (model/grad_accumulation.py): their hooks
        get a placeholder, and the buffer is zeroed each step. Read as the GEMM functions read it, each time."""
        return [p for p in self._offsets if accumulates_in_backward(p)]

    # ----- gradient sync ------------------------------------------------------------------------------------
    def _keep(self, p: torch.Tensor) -> None:
        """Direct: the gradient autograd accumulated is this step's whole gradient; keep it, in the parameter's
        layout, and take it off the parameter."""
        if p in self._kept:   # excluded by direct_gradients: one backward per step, non-reentrant recompute
            raise RuntimeError(f"{self._names[p]}: a second gradient in one step with direct gradients")  # type: ignore[index]
        g = p.grad
        assert g is not None
        self._kept[p] = g if g.is_contiguous() else g.contiguous()
        p.grad = None

    def _make_hook(self, bucket: Bucket) -> Callable:
        def hook(p: torch.Tensor) -> None:
            if not accumulates_in_backward(p):   # (else its gradient is in `main_grad` already)
                first = p in self._untouched   # first gradient of the step: a copy, so zero_grad need not clear
                accumulate(p.main_grad, p.grad, first)  # type: ignore[attr-defined, arg-type]  # set in __init__
                if first:
                    self._untouched.discard(p)
            p.grad = None
            if self.overlap and self._sync and not bucket.late:
                bucket.pending -= 1
                if bucket.pending == 0:
                    self._reduce(bucket)
        return hook

    def _reduce(self, b: Bucket) -> None:
        if self.ps.dp == 1:
            return
        grad = self.grad_data[b.start:b.end]
        grad.div_(self.ps.dp)
        if self.zero == 1 and grad.is_cuda:
            lo, hi = self.shard(b)
            b.handle = dist.reduce_scatter_tensor(self.grad_data[lo:hi], grad, group=self.ps.dp_group,
                                                  async_op=True)
        else:  # ZeRO-0, or gloo (no reduce-scatter): all-reduce, each rank reads its shard
            b.handle = dist.all_reduce(grad, group=self.ps.dp_group, async_op=True)

    def zero_grad(self) -> None:
        """Lazy: each parameter's first gradient overwrites its slot (one fp32 pass fewer per step);
        `finish_grad_sync` clears the slots of parameters that got no gradient. Padding stays zero.
        With fused weights (which only add) the whole buffer is zeroed instead, in one pass.
        Direct: forgets the gradients kept from the last step, if any."""
        if self.fused():
            self.grad_data.zero_()
            self._untouched = set()
        else:
            self._untouched = set() if self.direct else set(self._offsets)   # direct: `_kept` says who got one
        self._kept = {}
        for b in self.buckets:
            b.pending, b.handle = len(b.params), None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside accumulates gradients without starting reductions (every micro-batch but the last)."""
        sync, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = sync

    def finish_grad_sync(self) -> None:
        """Wait for overlapped reductions, then do the ones that had to wait for the whole backward."""
        if self.direct:   # DP 1 and nothing late: no reduction to do; a parameter backward missed has zeros
            if len(self._kept) < len(self._offsets):
                for p in self._offsets:
                    if p not in self._kept:
                        self._kept[p] = torch.zeros_like(p)
            return
        for p in self._untouched:
            p.main_grad.zero_()  # type: ignore[attr-defined]  # the buffer view set in __init__
        self._untouched = set()
        for b in self.buckets:
            if not b.late and b.handle is None:
                self._reduce(b)
        if self._tp_late:  # sequence-parallel params saw only this rank's tokens
            _all_reduce_coalesced([p.main_grad for p in self._tp_late], self.ps.tp_group)
        if self._stage_late and self.ps.embedding_group is not None:
            _all_reduce_coalesced([p.main_grad for p in self._stage_late], self.ps.embedding_group)
        for b in self.buckets:
            if b.late:
                self._reduce(b)
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()


def _slot(buffer: torch.Tensor, offset: int, shape: torch.Size) -> torch.Tensor:
    """`buffer[offset:offset + numel].view(shape)`, but a tensor of its own, with its own version counter rather
    than the view's shared one: a `main_grad` that a compiled graph saves for backward is checked against
    in-place changes, and the buffer's other slots change all through backward (model/grad_accumulation.py)."""
    t = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
    stride = torch.empty(shape, device="meta").stride()   # contiguous
    return t.set_(buffer.untyped_storage(), buffer.storage_offset() + offset, shape, stride)


def _all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()
