"""The gradient-bucket layout has one home, gpt3d/optim/buckets.py: GradBuffer places every parameter where
`bucket_layout` says and hands out the shards `local_pieces` says; the planner's persistent bytes
(plan/memory.persistent_bytes) come from the same function, so for any parameter list they are GradBuffer's bytes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from tests.support.fuzz import fuzz

from gpt3d.optim.buckets import bucket_alignment, bucket_layout, local_pieces
from gpt3d.optim.grad_buffer import GradBuffer
from gpt3d.parallel.param_meta import ParamMeta, set_meta
from gpt3d.parallel.state import ParallelState
from gpt3d.plan.layout import Candidate
from gpt3d.plan.memory import ParamInfo, persistent_bytes

params_st = st.lists(st.tuples(st.integers(1, 300), st.booleans()), min_size=1, max_size=12)


class _Model(nn.Module):
    def __init__(self, sizes: list[tuple[int, bool]]):
        super().__init__()
        self.ps = nn.ParameterList()
        for n, sp in sizes:
            p = nn.Parameter(torch.arange(n, dtype=torch.float32))
            set_meta(p, sequence_parallel=sp)
            self.ps.append(p)


@fuzz(60)
@given(params_st, st.sampled_from([1, 2, 4]), st.sampled_from([0, 1]), st.sampled_from([1, 2]),
       st.sampled_from([0.0001, 0.0005, 0.002, 40.0]), st.sampled_from([1, 2]))
def test_grad_buffer_and_planner_use_the_same_layout(sizes, dp, zero, tp, bucket_mb, micro):
    numels = [n for n, _ in sizes]
    late = [sp and tp > 1 for _, sp in sizes]
    eff = zero if dp > 1 else 0
    layout = bucket_layout(numels, late, bucket_size_mb=bucket_mb, dp=dp, zero=eff)
    # every parameter once, contiguous, padded to the alignment, the late ones last
    assert sorted(i for b in layout for i in b.members) == list(range(len(numels)))
    assert [b.late for b in layout] == sorted(b.late for b in layout)
    for prev, b in zip([None] + layout, layout):
        assert b.start == (prev.end if prev else 0) and (b.end - b.start) % bucket_alignment(dp, eff) == 0
        assert list(b.offsets) == [b.start + sum(numels[j] for j in b.members[:k]) for k in range(len(b.members))]
    # the DP shards partition every parameter
    covered = [0] * len(numels)
    for r in range(dp):
        for i, lo, hi, _ in local_pieces(layout, numels, dp, r, eff):
            covered[i] += hi - lo
    assert covered == [n * (dp if eff == 0 else 1) for n in numels]

    model = _Model(sizes)
    want = {id(p): off for b in layout for i, off in zip(b.members, b.offsets) for p in [model.ps[i]]}
    for r in range(dp):
        ps = ParallelState(tp=tp, dp=dp, rank=r * tp)
        buf = GradBuffer([_Model(sizes)], ps, zero_stage=zero, bucket_size_mb=bucket_mb, micro_batches=micro) if r \
            else GradBuffer([model], ps, zero_stage=zero, bucket_size_mb=bucket_mb, micro_batches=micro)
        if r == 0:
            for p in model.parameters():
                assert p.data.data_ptr() == buf.param_data[want[id(p)]:].data_ptr()
        infos = [ParamInfo(f"ps.{i}", n, ParamMeta(sequence_parallel=sp)) for i, (n, sp) in enumerate(sizes)]
        lay = Candidate(tp=tp, pp=1, dp=dp, mbs=1, num_micro=micro, zero=zero)
        pred = persistent_bytes(infos, lay, dp_rank=r, param_bytes=4, bucket_size_mb=bucket_mb)
        ranges = list(buf.local_ranges())
        assert pred.grads == buf.nbytes() and pred.params == buf.param_nbytes()
        # no gradient buffer exactly where nothing adds to or reduces a gradient (optim/buckets.py)
        assert pred.direct == buf.direct == (dp == 1 and micro == 1 and not any(late))
        assert (buf.nbytes() == 0) == buf.direct
        assert pred.shard_elements == sum(x.hi - x.lo for x in ranges) and pred.adam_steps == 4 * len(ranges)
        assert pred.buckets == len(buf.buckets) and pred.late_elements == sum(b.end - b.start for b in buf.buckets
                                                                             if b.late)
