"""Rewrite gpt3d/plan/calibration.json (the calibration shipped with the package) from the last
`<!-- plan-calibration {...} -->` line of benchmarks/RESULTS.md, after a new measurement was logged there.

A developer's tool: an installed gpt3d has no benchmarks/ and reads only the packaged JSON
(gpt3d.plan.presets.measured_calibration); tests/end_to_end/test_plan_installed.py checks the two agree.
Usage: python benchmarks/update_calibration.py
"""
from __future__ import annotations

import dataclasses
import json
import os

from gpt3d.plan.presets import CALIBRATION_DATA, Calibration, load_calibration

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
TARGET = os.path.join(HERE, "..", "gpt3d", "plan", CALIBRATION_DATA)


def packaged_form(c: Calibration) -> dict:
    """What calibration.json holds: every figure of the calibration, its source first."""
    d = dataclasses.asdict(c)
    return {"source": d.pop("source"), **d}


def main() -> None:
    c = load_calibration(RESULTS_MD)
    with open(TARGET, "w") as fh:
        json.dump(packaged_form(c), fh, indent=2)
        fh.write("\n")
    print(f"{os.path.normpath(TARGET)}: {c.source}")


if __name__ == "__main__":
    main()
