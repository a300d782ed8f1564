"""Train a tiny GPT for a few iterations under a given layout and return its curve.

Used inside spawned gloo workers (and in-process for the single-process
reference): same seed, same data, same global batch — only the layout differs.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from gpt3d.config import Config
from gpt3d.data.sampler import build_data_loader
from gpt3d.parallel.state import ParallelState, build_parallel_state
from gpt3d.train import Trainer
from gpt3d.train.report import dp_mean


def tiny_config(**overrides) -> Config:
    cfg = Config.from_dict({
        "num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "vocab_size": 256, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "micro_batch_size": 2, "global_batch_size": 8, "train_iters": 12, "eval_iters": 2,
        "lr": 1e-2, "min_lr": 1e-3, "lr_warmup_iters": 2, "weight_decay": 0.1, "clip_grad": 1.0,
        "mock_data": True, "seed": 7, "bucket_size_mb": 0.01, "log_interval": 1000,
    })
    cfg.model.make_vocab_size_divisible_by = 8
    for k, v in overrides.items():
        cfg_section = next(s for s in ("model", "parallel", "optimizer", "scheduler", "precision", "data",
                                       "training", "checkpoint") if hasattr(getattr(cfg, s), k))
        setattr(getattr(cfg, cfg_section), k, v)
    return cfg


def make_trainer(cfg: Config) -> Trainer:
    if dist.is_initialized():
        ps = build_parallel_state(cfg.parallel, dist.get_world_size(), dist.get_rank(), torch.device("cpu"))
    else:
        ps = ParallelState()
    return Trainer(cfg, ps)


def run_curve(cfg: Config, iters: Optional[int] = None, trainer: Optional[Trainer] = None) -> dict:
    """Per-iteration train loss and grad norm, then the validation loss (on the logging rank)."""
    t = trainer or make_trainer(cfg)
    train_ds, valid_ds, _ = t.build_datasets()
    loader = iter(build_data_loader(train_ds, t.state.consumed_samples, cfg.training.micro_batch_size,
                                    t.ps.dp_rank, t.ps.dp))
    losses, norms = [], []
    for _ in range(iters or cfg.training.train_iters - t.state.iteration):
        r = t.train_step(t.microbatches(loader))
        losses.append(dp_mean(r.loss if r.loss is not None else torch.zeros(1), t.ps))
        norms.append(float(r.grad_norm))
    val = t.evaluate(valid_ds)
    return {"losses": losses, "norms": norms, "val": val, "logging": t.ps.is_logging_rank,
            "state_bytes": t.optimizer.state_bytes(), "trainer": None}


@contextlib.contextmanager
def float64():
    """Train in float64 (fp32 runs use torch's default dtype, gpt3d/parallel/precision.py): a layout's other
    reduction order then moves a curve by ~1e-13, on every CPU, while a wrong layout moves it by >1e-3."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def layout_curve(overrides: dict) -> dict:
    """The curve of the tiny model under `overrides`, in float64 (the layout tests' arithmetic)."""
    with float64():
        return run_curve(tiny_config(**overrides))


def layout_worker(rank: int, world: int, layouts: list) -> list:
    """Run several layouts in one spawned job; returns the logging rank's curves (None elsewhere)."""
    out = []
    for overrides in layouts:
        r = layout_curve(overrides)
        out.append(r if r["logging"] else {"state_bytes": r["state_bytes"]})
    return out


def broken_tp_worker(rank: int, world: int, iters: int) -> dict:
    """TP=2 curves with a broken reduction (tests/distributed/test_layouts.py): "no-grad-reduce" leaves out the
    all-reduce of the input gradient of column-parallel layers; "fp32-rounding" scales the result of every TP
    all-reduce by 1 + 2^-24, one fp32 rounding. Returns {kind: curve} on rank 0."""
    from unittest import mock

    from gpt3d.parallel import mappings
    honest = mappings._all_reduce
    breaks = {"no-grad-reduce": mock.patch.object(mappings._CopyToTP, "backward",
                                                  staticmethod(lambda ctx, g: (g, None))),
              "fp32-rounding": mock.patch.object(mappings, "_all_reduce",
                                                 lambda x, group: honest(x, group).mul_(1 + 2.0 ** -24))}
    out = {}
    for kind, patch in breaks.items():
        with patch:
            out[kind] = layout_curve(dict(tensor_model_parallel_size=2, train_iters=iters))
    return out


def save_worker(rank: int, world: int, overrides: dict, path: str, iters: int) -> Optional[list]:
    """Train `iters` steps under a layout and save a checkpoint there."""
    cfg = tiny_config(save=path, **overrides)
    t = make_trainer(cfg)
    r = run_curve(cfg, iters=iters, trainer=t)
    t.save()
    return r["losses"] if r["logging"] else None


def resume_worker(rank: int, world: int, overrides: dict, path: str) -> Optional[dict]:
    cfg = tiny_config(load=path, **overrides)
    t = make_trainer(cfg)
    t.load(path)
    r = run_curve(cfg, trainer=t)
    return r if r["logging"] else None


def overflow_worker(rank: int, world: int, zero_stage: int) -> dict:
    """Rank 1 alone sees an inf gradient: every rank must skip the step."""
    import math
    cfg = tiny_config(zero_stage=zero_stage)
    t = make_trainer(cfg)
    train_ds, _, _ = t.build_datasets()
    loader = iter(build_data_loader(train_ds, 0, 2, t.ps.dp_rank, t.ps.dp))
    finish = t.grads.finish_grad_sync

    def poisoned():
        finish()
        if rank == 1:
            t.grads.gradient(next(t.grads.local_ranges()))[0] = float("inf")   # buffer or direct gradients
    t.grads.finish_grad_sync = poisoned
    before = [p.detach().clone() for p in t.model[0].parameters()]
    first = t.train_step(t.microbatches(loader))
    unchanged = all(torch.equal(a, p) for a, p in zip(before, t.model[0].parameters()))
    t.grads.finish_grad_sync = finish
    second = t.train_step(t.microbatches(loader))
    changed = any(not torch.equal(a, p) for a, p in zip(before, t.model[0].parameters()))
    return {"unchanged": unchanged, "norm": float(first.grad_norm), "skipped": float(first.skipped),
            "then_steps": changed and math.isfinite(float(second.grad_norm)) and float(second.skipped) == 0.0}
