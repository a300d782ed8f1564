"""One timer for the exploratory GPU probes (cudnn_dropout_plans.py, gemm_dtype_probe.py, cublaslt_check.py): the
median of CUDA-event times of single calls after three warm-up calls, in milliseconds.

Each timed call is queued behind a short GPU spin (`torch.cuda._sleep`), so the host has launched it before the GPU
reaches the start event: the time is the GPU's alone. Before session 40 it was not, and a call that spends tens of
microseconds in Python before its kernel (a custom op through nvmath-python's bindings) was charged for them
although a training step, which queues ahead, hides them.

The older checks keep their own timers (adamw_check's one warm-up, accumulate_check's mean, fp8_mlp_check's
microseconds): their numbers in RESULTS.md were taken with them."""
from __future__ import annotations

import statistics

import torch


SPIN_CYCLES = 2_000_000   # ~1 ms at H100/H200 clocks: more than any host launch path here takes


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)
