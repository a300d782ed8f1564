"""Weights & Biases beside TensorBoard (issue 26): Megatron-LM's --wandb-project/--wandb-exp-name/--wandb-save-dir,
run offline (WANDB_MODE=offline): the offline run holds exactly the scalars TensorBoard gets; without wandb
installed the flag is one error line naming the extra."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.support import ROOT, runs
from tests.support.wandb_offline import history

WANDB_ONLY = {"tokens", "_step", "_runtime", "_timestamp"}   # W&B's x axis for loss_vs_tokens, and its own keys


def _train(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt3d", "train", *runs.TINY, *args], capture_output=True,
                          text=True, cwd=str(tmp_path), env={**os.environ, "OMP_NUM_THREADS": "1",
                                                              "PYTHONPATH": str(ROOT),
                                                              "GPT3D_RUNS_DIR": str(tmp_path / "runs"),
                                                              **(env or {})})


def _tensorboard(directory) -> dict:
    """tag -> [(step, value)] of the TensorBoard events in `directory`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(directory))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _wandb(save_dir) -> tuple[dict, str]:
    """tag -> [(step, value)] of the offline run under `save_dir` (loss_vs_tokens against its logged tokens, as
    TensorBoard plots it), and the run's directory name."""
    [run] = list((save_dir / "wandb").glob("offline-run-*"))
    [log] = list(run.glob("run-*.wandb"))
    out: dict = {}
    for row in history(log):
        for key, value in row.items():
            if key not in WANDB_ONLY:
                step = row["tokens"] if key == "loss_vs_tokens" else row["_step"]
                out.setdefault(key, []).append((step, value))
    return out, run.name


def test_the_offline_wandb_run_holds_the_scalars_tensorboard_gets(tmp_path):
    pytest.importorskip("wandb")
    r = _train(tmp_path, "--train-iters", "4", "--eval-interval", "2", "--log-interval", "2",
               "--tensorboard-dir", "tb", "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard",
               "--log-validation-ppl-to-tensorboard", "--run-name", "wb",
               "--wandb-project", "gpt3d-test", "--wandb-exp-name", "tiny-offline", "--wandb-save-dir", "wbdir",
               env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr
    assert "W&B: project gpt3d-test, files in" in r.stdout
    tb, (wb, run_name) = _tensorboard(tmp_path / "tb"), _wandb(tmp_path / "wbdir")
    assert run_name.startswith("offline-run-")
    assert {"loss", "lr", "grad_norm", "val_loss", "loss_vs_tokens", "iteration-time/iteration-time",
            "batch-size/batch-size", "lm-loss-validation/lm loss validation ppl"} <= set(tb)
    assert set(wb) == set(tb)
    for tag, points in tb.items():   # TensorBoard stores float32
        assert [s for s, _ in wb[tag]] == [s for s, _ in points], tag
        assert np.array_equal(np.float32([v for _, v in wb[tag]]), np.float32([v for _, v in points])), tag
    assert [s for s, _ in tb["loss"]] == [2, 4] and [s for s, _ in tb["loss_vs_tokens"]] == [2 * 64, 4 * 64]
    # and the same numbers as the metrics file in the run's directory
    rows = [json.loads(x) for x in (tmp_path / "runs" / "wb" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]
    assert np.array_equal(np.float32([r["loss"] for r in rows]), np.float32([v for _, v in wb["loss"]]))


def test_wandb_flag_without_wandb_is_one_error_line_naming_the_extra(tmp_path):
    shadow = tmp_path / "shadow" / "wandb"        # an environment without wandb: its import fails
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    r = _train(tmp_path, "--train-iters", "2", "--wandb-project", "p",
               env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(ROOT)])})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and err == ['gpt3d: error: --wandb-project needs Weights & Biases: pip install -e '
                                         '".[wandb]"'], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shadow"]   # nothing made: no run directory, no files
