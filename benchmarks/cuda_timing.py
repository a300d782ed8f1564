"""One timer for the exploratory GPU probes (cudnn_dropout_plans.py, gemm_dtype_probe.py): the median of CUDA-event
times of single calls after three warm-up calls, in milliseconds.

The older checks keep their own timers (adamw_check's one warm-up, accumulate_check's mean, fp8_mlp_check's
microseconds): their numbers in RESULTS.md were taken with them."""
from __future__ import annotations

import statistics

import torch


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)
