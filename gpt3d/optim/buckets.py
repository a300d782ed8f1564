"""Where each parameter's gradient lives in the contiguous buffers, and which part of it each DP rank owns.

Why its own module: the layout is pure arithmetic on parameter sizes, and two places need it — `GradBuffer`
(optim/grad_buffer.py), which builds its buffers from it, and the planner (plan/memory.py), which predicts a
rank's bytes from it without building anything. One function, so the two cannot drift.

Buckets fill in reverse registration order (roughly the order backward produces gradients) up to
`bucket_size_mb` of fp32 gradients; parameters whose gradients need a TP or embedding all-reduce first (`late`)
come after the others, in buckets of their own. Under ZeRO-1 each bucket is padded to a multiple of DP*64
elements and DP rank d owns the d-th contiguous 1/DP of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import Optional


@dataclass(frozen=True)
class BucketSpec:
    start: int                 # buffer offsets [start, end), end - start divisible by DP*64 at ZeRO-1
    end: int
    members: tuple             # indices into the parameter list given to `bucket_layout`, in buffer order
    offsets: tuple             # buffer offset of each member
    late: bool = False         # reduced after backward (needs a TP / embedding all-reduce first)


def late_reductions(sequence_parallel: bool, tied_across_stages: bool, tp: int, pp: int) -> tuple[bool, bool]:
    """(summed over TP, summed over the pipeline's first and last stages) before a gradient's DP reduction:
    sequence-parallel norms and biases saw only their TP rank's tokens; the tied embedding has a copy on
    the first and the last stage."""
    return sequence_parallel and tp > 1, tied_across_stages and pp > 1


def late_reduction(sequence_parallel: bool, tied_across_stages: bool, tp: int, pp: int) -> bool:
    """Must the gradient wait for the whole backward (a `late` bucket)? Yes if it needs either reduction."""
    return any(late_reductions(sequence_parallel, tied_across_stages, tp, pp))


def direct_gradients(dp: int, micro_batches: Optional[int], late: Sequence[bool]) -> bool:
    """Can the optimizer read autograd's gradients as they are, with no gradient buffer at all? Where nothing
    adds to or reduces a gradient after backward made it: DP 1, one micro-batch per step, no late reduction.
    The buffer would then hold an exact copy (a half-to-fp32 conversion is exact), so for the same gradient
    norm the AdamW step gives the same bits either way; on CUDA the norm itself may differ in the last place
    (its kernel sums half elements in another order), which moves a clipped step by that rounding. Skipping
    the buffer saves the hooks' copy, part of the norm's read and the buffer's 4 bytes a parameter; the half
    gradients (2 bytes) live from backward to the step instead of being freed by the copy."""
    return dp == 1 and micro_batches == 1 and not any(late)


def effective_zero_stage(zero_stage: int, dp: int) -> int:
    """The ZeRO stage that runs: at DP 1 there is nothing to shard, so stage 1 runs as stage 0."""
    return zero_stage if dp > 1 else 0


def bucket_alignment(dp: int, zero: int) -> int:
    """Elements a bucket's size is a multiple of: DP*64 under ZeRO-1 (equal shards), else 1."""
    return dp * 64 if zero else 1


def bucket_layout(numels: Sequence[int], late: Sequence[bool], *, bucket_size_mb: float, dp: int,
                  zero: int) -> list[BucketSpec]:
    """The buckets of parameters of `numels` elements, given in registration order (`late[i]`: parameter i is
    reduced after backward). `zero`: the effective ZeRO stage (0 with DP = 1)."""
    cap = max(1, int(bucket_size_mb * 2 ** 20 / 4))   # bucket size counted in fp32 gradient bytes
    align = bucket_alignment(dp, zero)
    order = list(reversed(range(len(numels))))
    buckets, start = [], 0
    for is_late in (False, True):
        group = [i for i in order if late[i] == is_late]
        cur: list[int] = []
        n = 0
        for j, i in enumerate(group):
            cur.append(i)
            n += numels[i]
            if n >= cap or j == len(group) - 1:
                end = start + math.ceil(n / align) * align
                offsets, off = [], start
                for k in cur:
                    offsets.append(off)
                    off += numels[k]
                buckets.append(BucketSpec(start, end, tuple(cur), tuple(offsets), is_late))
                start, cur, n = end, [], 0
    return buckets


def shard_range(start: int, end: int, dp: int, dp_rank: int, zero: int) -> tuple[int, int]:
    """DP rank `dp_rank`'s buffer range of the bucket [start, end) (the whole bucket at ZeRO-0)."""
    if zero == 0:
        return start, end
    size = (end - start) // dp
    return start + dp_rank * size, start + (dp_rank + 1) * size


def local_pieces(buckets: Sequence[BucketSpec], numels: Sequence[int], dp: int, dp_rank: int,
                 zero: int) -> Iterator[tuple[int, int, int, int]]:
    """(parameter index, lo, hi, buffer offset of lo) of every parameter range inside the rank's shards, bucket
    by bucket: elements [lo, hi) of the flattened parameter."""
    for b in buckets:
        lo, hi = shard_range(b.start, b.end, dp, dp_rank, zero)
        for i, off in zip(b.members, b.offsets):
            s, e = max(lo, off), min(hi, off + numels[i])
            if s < e:
                yield i, s - off, e - off, s
