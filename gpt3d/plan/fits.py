"""Sizes no memory can hold, refused before anything is allocated.

Why its own module: it is the one rule for impossible sizes (sequence length, micro-batch, global batch, model
shape, the sample index), applied by `gpt3d train` before it builds anything. The planner's memory model
(memory.py: exact for parameters, gradients and optimizer states, exact for eager activations on CPU, within a
few percent of compiled ones) predicts this rank's peak; a prediction above the device's *whole* memory could
never run, so it is one `gpt3d: error:` line at start naming the largest terms, instead of an allocator
traceback (or the kernel's out-of-memory kill) later. Layouts that merely come close are left to
`--check-memory`, which compares against usable memory. The memory model has no FP8 term (its activations are
bf16's): with --fp8 only what FP8 could never save is held against the memory, the activations less
FP8_MOST_ACTIVATIONS_SAVED of them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import Config
from ..errors import ConfigError
from ..model.build import compile_enabled, device_memory, param_dtype, refuse_a_vocabulary_beyond_memory
from ..model.gpt import count_parameters
from ..parallel.state import ParallelState
from .layout import layout_of
from .memory import StageMemory, plan_memory
from .presets import GIB
from .search import unmodelled

INDEX_BYTES_PER_SAMPLE = 16   # shuffle_idx (int64) + sample_idx (2 x int32) per indexed sample, gpt_dataset.py
# FP8 keeps a linear's input in one byte where bf16 kept two, so at most half of what a layer keeps goes (measured
# on one H100 at 1.3B: 49.3 -> 40.3 GiB per linear, 48.0 -> 43.3 with the fused GeLU MLP of gpt3d/model/fp8_mlp.py;
# benchmarks/RESULTS.md 2026-12-06). Halving all "activations"
# (the bf16 head's logits and the dropout masks included, which FP8 does not shrink) errs towards letting a run start.
FP8_MOST_ACTIVATIONS_SAVED = 0.5


def refuse_what_cannot_fit(cfg: Config, ps: ParallelState, vocab_size: int, indexed_samples: Optional[int] = None
                           ) -> None:
    """ConfigError when this job's busiest rank could never fit in its device's memory, or the sample index of
    `indexed_samples` (real data) in the host's. The same verdict on every rank of a job of one kind of device."""
    refuse_a_vocabulary_beyond_memory(cfg, ps, vocab_size)
    have = device_memory(ps.device)
    m, p = cfg.model, cfg.parallel
    if have is not None:
        where = f"the {have / GIB:,.1f} GiB of {ps.device.type} memory"
        param_bytes = param_dtype(cfg.precision).itemsize
        n = count_parameters(m, vocab_size)["total"]
        floor = n // (ps.tp * ps.pp) * (param_bytes + 4)   # parameters and their fp32 gradients, nothing else
        if floor > have:
            raise ConfigError(f"a model of {n:,} parameters needs at least {floor / GIB:,.1f} GiB per rank (parameters "
                              f"and fp32 gradients over TP x PP = {ps.tp} x {ps.pp}), more than {where}: it could "
                              "never run (check --num-layers, --hidden-size, --ffn-hidden-size)")
        lay = layout_of(cfg, ps.world_size)
        stages = plan_memory(m, vocab_size, lay, param_bytes=param_bytes, bucket_size_mb=p.bucket_size_mb,
                             compiled=compile_enabled(cfg.training, ps.device),
                             fused_loss=lay.tp == 1 and ps.device.type == "cuda",
                             device=ps.device.type, granularity=cfg.training.compile_granularity,
                             fp8=cfg.precision.fp8)
        def fp8_saved(s: StageMemory) -> float:
            return FP8_MOST_ACTIVATIONS_SAVED * s.breakdown()["activations"] if cfg.precision.fp8 else 0.0
        busiest = max(stages, key=lambda s: s.peak - fp8_saved(s))
        saved = fp8_saved(busiest)
        if busiest.peak - saved > have:
            top = sorted(busiest.breakdown().items(), key=lambda kv: -kv[1])[:3]
            fp8 = (f" (with --fp8 at least {(busiest.peak - saved) / GIB:,.1f}: " + "; ".join(unmodelled(cfg)) + ")"
                   if saved else "")
            raise ConfigError(
                f"this layout needs about {busiest.peak / GIB:,.1f} GiB per rank{fp8} (pipeline stage "
                f"{busiest.pp_rank}; {', '.join(f'{k} {v / GIB:,.1f}' for k, v in top)}), more than {where}: it "
                f"could never run (--seq-length {m.seq_length}, --micro-batch-size {cfg.training.micro_batch_size}, "
                f"{lay.num_micro} micro-batches per step; see `gpt3d plan` for layouts that fit)")
    host = device_memory(torch.device("cpu"))
    if indexed_samples is not None and host is not None and indexed_samples * INDEX_BYTES_PER_SAMPLE > host:
        need = indexed_samples * INDEX_BYTES_PER_SAMPLE
        raise ConfigError(f"the sample index of {indexed_samples:,} samples (train, validation and test, from "
                          "--train-iters/--train-samples, the global batch, --eval-iters and --eval-interval) needs "
                          f"about {need / GIB:,.1f} GiB, more than the {host / GIB:,.1f} GiB of host memory")
