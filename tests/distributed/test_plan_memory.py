"""The planner's persistent bytes per rank equal what gpt3d's ranks really hold, to the byte.

Parameters (contiguous buffer, bucket padding included), fp32 gradient buffer,
fp32 masters and Adam moments/steps of the rank's ZeRO shard: predicted by
gpt3d.plan.memory from the config alone, measured from the gradient buffer's and
the sharded optimizer's byte reports and a walk of every storage a trained rank
holds (`held_bytes`). Real gloo jobs at TP/PP/DP/ZeRO layouts (the shared jobs of
tests/support/plan_jobs.py), plus a single-process sweep over many more layouts with
stand-in ranks. (That the planner's parameter list is the model's, for any small model: tests/unit/test_plan_params.py.)
"""
from __future__ import annotations

import pytest
import torch

from gpt3d.config import OptimizerConfig
from gpt3d.data.sampler import build_data_loader
from gpt3d.model.build import build_model_chunks
from gpt3d.optim.grad_buffer import GradBuffer
from gpt3d.optim.zero import ZeroOptimizer
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState
from gpt3d.plan.layout import layout_of
from gpt3d.plan.memory import persistent_bytes, stage_params

from tests.support import plan_jobs
from tests.support.curves import make_trainer, tiny_config


def held_bytes(model, grads: GradBuffer, optimizer: ZeroOptimizer) -> dict:
    """Bytes this rank holds, by kind. The figures are the public byte reports: the gradient buffer's
    `param_nbytes()` (the contiguous parameter buffer, which the model's parameters are views of) and
    `nbytes()` (fp32 gradients), and the sharded optimizer's `state_bytes()` (fp32 masters if separate,
    Adam moments). No report covers Adam's step counters, and reports could miss an allocation, so this
    also walks every distinct storage reachable from the parameters, their `main_grad` views and the
    optimizer's masters, moments and step counts: `adam_steps` and `all_storages` (the walk's total) come
    from it.

    The one place that knows where gpt3d keeps these tensors: adapt it when the optimizer changes."""
    seen: dict = {}

    def add(kind: str, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), (kind, st.nbytes()))   # a storage counts once

    for c in model:
        for p in c.parameters():
            add("params", p)
            if hasattr(p, "main_grad"):   # no buffer with direct gradients (optim/buckets.py)
                add("grads", p.main_grad)
    for m in optimizer.masters:
        add("masters", m)
    a = optimizer.adamw
    add("adam_moments", a.exp_avg)
    add("adam_moments", a.exp_avg_sq)
    add("adam_steps", a.steps)
    return {"params": grads.param_nbytes(), "grads": grads.nbytes(), "optimizer_state": optimizer.state_bytes(),
            "adam_steps": sum(n for kind, n in seen.values() if kind == "adam_steps"),
            "all_storages": sum(n for _, n in seen.values())}


def expected(r) -> dict:
    """The planner's `Persistent` in `held_bytes`'s kinds."""
    return {"params": r.params, "grads": r.grads, "optimizer_state": r.masters + r.adam_moments,
            "adam_steps": r.adam_steps, "all_storages": r.total}


def predicted(cfg, world: int, rank: int) -> dict:
    lay = layout_of(cfg, world)
    pp_rank, dp_rank = rank // (lay.tp * lay.dp), (rank // lay.tp) % lay.dp
    params = [p for c in stage_params(cfg.model, cfg.model.vocab_size, lay, pp_rank) for p in c]
    pb = 2 if cfg.precision.bf16 else 4
    return expected(persistent_bytes(params, lay, dp_rank=dp_rank, param_bytes=pb,
                                     bucket_size_mb=cfg.parallel.bucket_size_mb))


# world size -> layouts; a small bucket size so that buckets, their padding and shard edges all matter
LAYOUTS = {
    4: [dict(zero_stage=1), dict(zero_stage=1, bf16=True), dict(zero_stage=0, bf16=True),
        dict(pipeline_model_parallel_size=2, bf16=True),
        dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True, bf16=True),
        dict(tensor_model_parallel_size=2, sequence_parallel=True, zero_stage=1, bf16=True),
        dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1, zero_stage=1, bf16=True,
             global_batch_size=8, micro_batch_size=2),
        dict(tensor_model_parallel_size=4, bf16=True, global_batch_size=2)],   # DP 1, one micro-batch: direct
    8: [dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True, zero_stage=1,
             bf16=True, untie_embeddings_and_output_weights=True, use_rotary_position_embeddings=True,
             normalization="rmsnorm", swiglu=True, num_key_value_heads=2, disable_bias_linear=True)],
}


def _cfg(overrides: dict):
    return tiny_config(bucket_size_mb=0.004, train_iters=1, **overrides)


def held_worker(rank: int, world: int, layouts: list) -> list:
    """Train one step under each layout (so Adam's state exists), then report what this rank holds."""
    out = []
    for overrides in layouts:
        t = make_trainer(_cfg(overrides))
        train_ds, _, _ = t.build_datasets()
        loader = iter(build_data_loader(train_ds, 0, t.cfg.training.micro_batch_size, t.ps.dp_rank, t.ps.dp))
        t.train_step(t.microbatches(loader))
        out.append(held_bytes(t.model, t.grads, t.optimizer))
    return out


CASES = [(w, i) for w in LAYOUTS for i in range(len(LAYOUTS[w]))]


@pytest.mark.slow
@pytest.mark.parametrize("world,index", CASES, ids=[f"w{w}-{i}" for w, i in CASES])
def test_persistent_bytes_per_rank_are_exact(world, index):
    cfg = _cfg(LAYOUTS[world][index])
    for rank, per_layout in enumerate(plan_jobs.per_rank(world, "memory")):
        held = per_layout[index]
        assert held["optimizer_state"] > 0 and held["adam_steps"] > 0 and held["params"] > 0, held
        assert held == predicted(cfg, world, rank), f"rank {rank}"


# ----- single process: stand-in ranks (no collectives are needed to build the buffers) --------------------
SWEEP = [dict(tp=1, pp=1, dp=4, zero=1), dict(tp=1, pp=1, dp=3, zero=1), dict(tp=2, pp=2, dp=2, zero=1, sp=True),
         dict(tp=4, pp=1, dp=2, zero=0), dict(tp=1, pp=4, dp=2, zero=1), dict(tp=2, pp=2, dp=3, zero=1, vp=2)]


def _stand_in(cfg, tp, pp, dp, rank, sp=False, vp=1):
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.parallel.sequence_parallel = sp
    cfg.parallel.num_layers_per_virtual_pipeline_stage = cfg.model.num_layers // (pp * vp) if vp > 1 else None
    ps = ParallelState(tp=tp, pp=pp, dp=dp, rank=rank, sequence_parallel=sp)
    return ps, build_model_chunks(cfg, ps, seed_everything(1, ps), cfg.model.vocab_size)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("case", SWEEP, ids=[str(i) for i in range(len(SWEEP))])
def test_stand_in_ranks_match_the_optimizer_buffers(case, arch):
    extra = dict(use_rotary_position_embeddings=True, normalization="rmsnorm", swiglu=True, num_key_value_heads=2,
                 disable_bias_linear=True, untie_embeddings_and_output_weights=True) if arch == "llama" else {}
    tp, pp, dp, zero, vp = case["tp"], case["pp"], case["dp"], case["zero"], case.get("vp", 1)
    for rank in range(tp * pp * dp):
        cfg = tiny_config(num_layers=8, bucket_size_mb=0.003, bf16=True, zero_stage=zero, **extra)
        ps, chunks = _stand_in(cfg, tp, pp, dp, rank, case.get("sp", False), vp)
        names = [(n, p.numel()) for c in chunks for n, p in c.named_parameters()]
        lay = layout_of(cfg, tp * pp * dp)
        plan_chunks = stage_params(cfg.model, cfg.model.vocab_size, lay, ps.pp_rank)
        assert [(p.name, p.numel) for c in plan_chunks for p in c] == names
        grads = GradBuffer(chunks, ps, zero_stage=zero, bucket_size_mb=0.003)
        opt = ZeroOptimizer(grads, OptimizerConfig(), ps)
        # Adam's state is allocated with the optimizer (ZeroOptimizer.step would need peers)
        held = held_bytes(chunks, grads, opt)
        pred = persistent_bytes([p for c in plan_chunks for p in c], lay, dp_rank=ps.dp_rank, param_bytes=2,
                                bucket_size_mb=0.003)
        assert held == expected(pred), (rank, held, pred)
        assert pred.buckets == len(grads.buckets) and pred.shard_elements == sum(m.numel() for m in opt.masters)

