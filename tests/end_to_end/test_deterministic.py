"""--deterministic-mode: the flag's plumbing and CPU determinism (the GPU check is
benchmarks/deterministic_check.py; row: the same command run twice on a GPU diverged from iteration 5)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from gpt3d.train import determinism
from gpt3d.train import loop

from tests.support import runs

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def test_two_runs_give_identical_losses_with_the_mode_on_during_the_run(tmp_path, monkeypatch):
    seen = []
    step = loop.Trainer.train_step

    def spy(self, microbatches):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                     os.environ.get("NCCL_ALGO"), torch.backends.cudnn.deterministic))
        return step(self, microbatches)
    monkeypatch.setattr(loop.Trainer, "train_step", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("NCCL_ALGO", raising=False)
    curves = []
    for k in range(2):
        log = tmp_path / f"m{k}.jsonl"
        assert runs.train("--train-iters", "6", "--deterministic", "--log-file", str(log)) == 0
        rows = map(json.loads, log.read_text().splitlines())
        curves.append([(r["loss"], r["grad_norm"]) for r in rows if "loss" in r])
    assert curves[0] == curves[1] and len(curves[0]) == 6
    assert set(seen) == {(True, ":4096:8", "Ring", True)}
    # restored afterwards (in-process callers; a CLI run simply exits)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    seen.clear()
    assert runs.train("--train-iters", "1") == 0
    assert seen[0][0] is False


@pytest.mark.parametrize("flags,env,message", [
    (["--attention-backend", "cudnn"], {}, "--attention-backend cudnn has no deterministic backward"),
    (["--attention-backend", "efficient"], {}, "--attention-backend efficient has no deterministic backward"),
    ([], {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}, "--deterministic-mode needs CUBLAS_WORKSPACE_CONFIG in"),
    ([], {"NCCL_ALGO": "NVLS"}, "--deterministic-mode needs NCCL_ALGO in"),
])
def test_settings_that_cannot_be_deterministic_are_refused(tmp_path, capsys, monkeypatch, flags, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert runs.train("--train-iters", "1", "--deterministic-mode", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not torch.are_deterministic_algorithms_enabled()


def test_apply_keeps_a_launchers_accepted_values_and_restores(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    monkeypatch.delenv("NCCL_ALGO", raising=False)
    undo = determinism.apply(True)
    try:
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and os.environ["NCCL_ALGO"] == "Ring"
        assert determinism.enabled() and torch.backends.cudnn.deterministic
        from torch._inductor import config
        assert config.deterministic
    finally:
        undo()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and "NCCL_ALGO" not in os.environ
    assert not determinism.enabled()
    assert determinism.apply(False)() is None
