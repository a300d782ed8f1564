"""The planner's pipeline model against gpt3d's real schedules (1F1B and interleaved), without a clock.

Each gloo rank runs the real `gpt3d.parallel.pipeline.forward_backward`, with the
training step's own `forward_step`, over chunks that record every forward and
backward (model chunk, micro-batch), while `batch_isend_irecv` records every
point-to-point call; one 4-process job runs every case (PP=2 as two pipelines
side by side). From that record:
  * the micro-batches in flight per stage (forwards whose backward has not run)
    are counted and compared with the planner's, which sizes activation memory;
  * the step is replayed with forward t_f/v and backward 2t_f/v per chunk (the
    stage times of benchmarks/pipeline_bubble.py), each p2p call finishing when
    its partners have posted theirs, and the resulting bubble is compared with
    the planner's step-time formula.
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from gpt3d.config import ParallelConfig
from gpt3d.parallel.pipeline import forward_backward
from gpt3d.parallel.state import build_parallel_state
from gpt3d.plan.schedule import bubble_fraction, in_flight, pipeline_time, schedule_ops
from gpt3d.train.step import gpt_forward_step

from tests.support import plan_jobs

HIDDEN = (1, 2, 4)


class _Mark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log, chunk):
        ctx.log, ctx.tag = log, (chunk, int(x.flatten()[0]))   # the micro-batch id rides in the values
        log.append(("F",) + ctx.tag)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.log.append(("B",) + ctx.tag)
        return g, None, None


class RecordingChunk(nn.Module):
    """GPTModel's calling convention (pre_process reads tokens, post_process returns what the loss is the
    mean of); records (F|B, chunk, micro-batch) into `log`."""

    def __init__(self, index: int, log: list, pre_process: bool, post_process: bool):
        super().__init__()
        self.index, self.log, self.pre_process, self.post_process = index, log, pre_process, post_process
        self.w = nn.Parameter(torch.zeros(HIDDEN[-1]))

    def forward(self, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = tokens.float().unsqueeze(-1).expand(HIDDEN) if self.pre_process else hidden
        y = _Mark.apply(x + self.w, self.log, self.index)
        return y.mean(-1) if self.post_process else y


def record_worker(rank: int, world: int, cases: list) -> list:
    """Per case (pp, m, v): this rank's events, compute ("F"|"B", chunk, mb) and p2p ("P", ((send|recv, peer),
    ...)), from the real forward_backward driven by the training step's own forward_step. A case with
    pp < world runs world/pp independent pipelines side by side (DP)."""
    out = []
    original = dist.batch_isend_irecv
    for pp, m, v in cases:
        log: list = []

        def recording(ops, log=log):
            log.append(("P", tuple(("send" if op.op is dist.isend else "recv", op.peer) for op in ops)))
            return original(ops)

        cfg = ParallelConfig(pipeline_model_parallel_size=pp,
                             num_layers_per_virtual_pipeline_stage=1 if v > 1 else None)
        ps = build_parallel_state(cfg, world, rank, torch.device("cpu"))
        chunks = [RecordingChunk(c, log, ps.is_first_stage and c == 0, ps.is_last_stage and c == v - 1)
                  for c in range(v)]
        mbs = [{"tokens": torch.full(HIDDEN[:2], i), "labels": torch.zeros(HIDDEN[:2], dtype=torch.long)}
               for i in range(m)]
        dist.batch_isend_irecv = recording
        try:
            forward_backward(chunks, mbs, ps, forward_step=gpt_forward_step, forward_only=False,
                             hidden_shape=HIDDEN, dtype=torch.float32)
        finally:
            dist.batch_isend_irecv = original
        out.append((ps.pp_rank, ps.dp_rank, log))
    return out


def replay(logs: dict, t_f: float, v: int) -> float:
    """Makespan of the recorded step of one pipeline ({global rank: events}): compute ops take t_f/v (forward)
    or 2t_f/v (backward); a p2p call ends when it and every partner call it matches (n-th send r->q with n-th
    recv of q from r) have been posted."""
    posted: dict = {}     # (src, dst, n) -> start time of the call that posted it, per side
    count: dict = {}
    calls = {}            # per rank: list of (event, matched keys)
    for r, log in logs.items():
        seq = []
        for ev in log:
            keys = []
            if ev[0] == "P":
                for kind, peer in ev[1]:
                    src, dst = (r, peer) if kind == "send" else (peer, r)
                    n = count[(kind, src, dst)] = count.get((kind, src, dst), -1) + 1
                    keys.append((kind, src, dst, n))
            seq.append((ev, keys))
        calls[r] = seq
    clock, pos = dict.fromkeys(logs, 0.0), dict.fromkeys(logs, 0)
    progress = True
    while progress:
        progress = False
        for r in logs:
            while pos[r] < len(calls[r]):
                ev, keys = calls[r][pos[r]]
                if ev[0] != "P":
                    clock[r] += (t_f if ev[0] == "F" else 2 * t_f) / v
                else:
                    for k in keys:
                        posted.setdefault(k, clock[r])
                    partners = [("recv" if k[0] == "send" else "send",) + k[1:] for k in keys]
                    if any(p not in posted for p in partners):
                        break        # wait for the peer to reach its matching call
                    clock[r] = max([clock[r]] + [posted[p] for p in partners])
                pos[r] += 1
                progress = True
    assert all(pos[r] == len(calls[r]) for r in logs), "replay deadlocked"
    return max(clock.values())


WORLD = 4
# (pp, micro-batches, chunks per stage): PP=4 alone, PP=2 as two pipelines side by side (DP=2), in one job
CASES = [(4, 4, 1), (4, 8, 1), (4, 4, 2), (4, 8, 2), (4, 12, 2), (2, 2, 2), (2, 4, 2), (2, 6, 1)]
IDS = [f"pp{pp}-m{m}-v{v}" for pp, m, v in CASES]


def _logs() -> list:
    """Per case: [(pp_rank, dp_rank, events) for every rank] (the shared 4-process job, tests/support/plan_jobs.py)."""
    per_rank = plan_jobs.per_rank(WORLD, "schedule")
    return [[r[i] for r in per_rank] for i in range(len(CASES))]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_in_flight_and_order_match_the_real_schedule(index):
    pp, m, v = CASES[index]
    for pp_rank, _dp_rank, log in _logs()[index]:
        compute = [ev for ev in log if ev[0] != "P"]
        assert len(compute) == 2 * m * v
        most, most_per_chunk = in_flight(compute, v)    # counted on what the real schedule did
        assert (most, most_per_chunk) == in_flight(schedule_ops(pp, pp_rank, v, m), v), f"stage {pp_rank}"
        assert compute == schedule_ops(pp, pp_rank, v, m), f"stage {pp_rank}: order differs"
    if v == 1 and m >= pp:   # 1F1B: stage r holds pp - r micro-batches (GPipe would hold all m)
        assert [in_flight(schedule_ops(pp, r, 1, m), 1)[0] for r in range(pp)] == list(range(pp, 0, -1))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_bubble_of_the_real_schedule_matches_the_model(index):
    pp, m, v = CASES[index]
    t_f = 1.0
    ranks = _logs()[index]
    for d in range(WORLD // pp):   # each pipeline replayed on its own (peers are global ranks)
        logs = {rank: log for rank, (_, dp_rank, log) in enumerate(ranks) if dp_rank == d}
        measured = replay(logs, t_f, v) / (3 * t_f * m) - 1
        model = pipeline_time([3 * t_f] * pp, m, v) / (3 * t_f * m) - 1
        assert model == pytest.approx(bubble_fraction(pp, v, m))
        assert measured == pytest.approx(model, abs=1e-9), (d, measured, model)
