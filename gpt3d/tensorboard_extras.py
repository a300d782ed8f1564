"""Megatron-DeepSpeed's optional TensorBoard scalars, switched on by its --log-*-to-tensorboard flags.

Kept apart from metrics.py so the regular metrics stay one small logger: these
are extra tags, under Megatron's names, so dashboards built for
Megatron-DeepSpeed runs read gpt3d runs too. Optimizer-state statistics need a
collective over the ranks holding optimizer shards, so `training_scalars` must
be called on every rank; only the logging rank writes what it returns.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .config import TrainingConfig
from .parallel.state import ParallelState

_SUMS = ("variance_l2", "variance_sqrt_l2", "momentum_l2", "weight_l2",
         "variance_l1", "variance_sqrt_l1", "momentum_l1", "weight_l1")
_MAXES = ("variance_abs_max", "variance_sqrt_abs_max", "momentum_abs_max", "weight_abs_max")


def optimizer_state_stats(optimizer, ps: ParallelState, sharded: bool) -> dict:
    """Norms and max |x| of Adam's exp_avg_sq, its sqrt, exp_avg and the fp32 weights, over the whole model.

    As Megatron-DeepSpeed sums them: over every rank when ZeRO shards the state (`sharded`), else over
    the tensor/pipeline ranks (data-parallel replicas hold copies). A parameter replicated across tensor
    ranks (norms, biases of row-parallel layers) counts once per rank there too."""
    state, _ = optimizer.param_space_state()
    sums = torch.zeros(8, dtype=torch.float64, device=ps.device)
    maxes = torch.zeros(4, dtype=torch.float64, device=ps.device)
    for entry in state.values():
        v, m, w = entry["exp_avg_sq"].float(), entry["exp_avg"].float(), entry["master"].float()
        root = v.sqrt()
        for j, x in enumerate((v, root, m, w)):
            sums[j] += x.pow(2).sum().double()
            sums[4 + j] += x.abs().sum().double()
            maxes[j] = torch.maximum(maxes[j], x.abs().max().double()) if x.numel() else maxes[j]
    if ps.distributed:
        group = None if sharded else ps.mp_group
        if sharded or ps.tp * ps.pp > 1:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    sums[:4] = sums[:4].sqrt()
    out = {f"optimizer/{k}": float(x) for k, x in zip(_SUMS, sums.tolist())}
    out.update({f"optimizer/{k}": float(x) for k, x in zip(_MAXES, maxes.tolist())})
    return out


def training_scalars(t: TrainingConfig, optimizer, ps: ParallelState, sharded: bool, global_batch: int,
                     seconds_per_iter: float) -> dict:
    """The extra tags for one training log step; collective when optimizer states are asked for."""
    out = {}
    if t.log_timers_to_tensorboard:
        out["iteration-time/iteration-time"] = seconds_per_iter
    if t.log_batch_size_to_tensorboard:
        out["batch-size/batch-size"] = float(global_batch)
    if t.log_optimizer_states_to_tensorboard:
        out.update(optimizer_state_stats(optimizer, ps, sharded))
    return out


def validation_scalars(t: TrainingConfig, ppl: Optional[float]) -> dict:
    if t.log_validation_ppl_to_tensorboard and ppl is not None:
        return {"lm-loss-validation/lm loss validation ppl": ppl}
    return {}
