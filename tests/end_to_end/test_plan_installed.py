"""The planner as an installed package has it: no benchmarks/ beside it, only what pyproject ships.

The default calibration (what `gpt3d plan --calibrate` uses without a GPU) is package data,
gpt3d/plan/calibration.json, the same figures as the last plan-calibration line of benchmarks/RESULTS.md
(benchmarks/update_calibration.py rewrites it). A wheel is built from the repository's pyproject and gpt3d/ alone,
unpacked into an empty directory and run from there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from gpt3d.plan.presets import CALIBRATION_DATA, load_calibration, measured_calibration

from tests.support import ROOT


def test_packaged_calibration_is_the_latest_measured_one():
    assert measured_calibration() == load_calibration(str(ROOT / "benchmarks" / "RESULTS.md"))


@pytest.mark.slow
def test_plan_runs_from_an_installed_wheel_without_the_repository(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "gpt3d", src / "gpt3d", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path, capture_output=True)
    site = tmp_path / "site"
    wheel, = (tmp_path / "dist").glob("gpt3d-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert f"gpt3d/plan/{CALIBRATION_DATA}" in z.namelist()
        z.extractall(site)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ROOT / "configs" / "gpt-13B.yaml", run / "model.yaml")
    env = {**os.environ, "PYTHONPATH": str(site), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "gpt3d", "plan", "--config", "model.yaml", "--gpus", "8",
                          "--calibrate", "--micro-batch-sizes", "1", "--save-calibration", "cal.json", "--json"],
                         cwd=run, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)
    got = load_calibration(str(run / "cal.json"))
    assert got == measured_calibration() and got.source.startswith("measured on NVIDIA H100")
