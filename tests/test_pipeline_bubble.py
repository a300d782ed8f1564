"""The 1F1B and interleaved schedules reach Megatron's bubble (P-1)/(v*m) at P=4, measured on sleeping stages.

Stage compute is a sleep (benchmarks/pipeline_bubble.py), so four gloo processes
behave like four devices on a 2-core machine; the schedule and the p2p are the real ones.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import pipeline_bubble  # noqa: E402


@pytest.mark.slow
def test_measured_bubble_matches_theory():
    one_f_one_b, interleaved = pipeline_bubble.measure(4, [(8, 1, 0.02), (8, 2, 0.02)], repeats=2)
    for r in (one_f_one_b, interleaved):
        assert abs(r["bubble"] - r["theory"]) < 0.1 + 0.3 * r["theory"], r
    assert interleaved["bubble"] < one_f_one_b["bubble"], (interleaved, one_f_one_b)
