"""Continuing Megatron-DeepSpeed's own runs: every reference checkpoint (tests/support/mds.py) loaded at its
global_step3 and trained for iterations 4-6 with the run's own command line, at the run's layout, at TP1 PP1
and at TP2 PP2, must give the losses, learning rates, gradient norms and validation loss Megatron-DeepSpeed
logged (losses.json): iteration 4 depends on the weights and the data position only, 5 and 6 on the
optimizer state, its update rule and the schedule too.

Runs of one world size share one job: the single-process ones go through `gpt3d.cli.main` in this process, the
2- and 4-process ones through gloo workers that parse the same command line with the CLI's parser.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt3d.cli import build_parser
from gpt3d.config.load import load_config
from gpt3d.cli import main as cli_main

from tests.support import ROOT, distributed
from tests.support.mds import FIXTURES, command, continuation_argv, flag, linked_data, logged, losses, needs_fixtures, \
    nproc, runs

pytestmark = needs_fixtures


def _layouts(run: str) -> dict:
    """tag -> (TP, PP, world): the run's own layout, TP1 PP1 and TP2 PP2."""
    args = command(run)
    own = (int(flag(args, "--tensor-model-parallel-size")), int(flag(args, "--pipeline-model-parallel-size")),
           nproc(run))
    out = {"own": own}
    for tag, lay in (("tp1pp1", (1, 1, 1)), ("tp2pp2", (2, 2, 4))):
        if lay != own:
            out[tag] = lay
    return out


def _plan() -> dict:
    jobs: dict = {}
    for run in runs():
        for tag, (tp, pp, world) in _layouts(run).items():
            jobs.setdefault(world, []).append((run, tag, tp, pp))
    return jobs


def _worker(rank: int, world: int, jobs: list, tmp: str) -> list:
    from gpt3d.parallel.state import build_parallel_state
    from gpt3d.train import Trainer
    out = []
    for run, tag, tp, pp in jobs:
        argv = continuation_argv(run, Path(tmp), tp, pp, tag)
        cfg = load_config(build_parser("train").parse_args(["train", *argv]))
        ps = build_parallel_state(cfg.parallel, world, rank, torch.device("cpu"))
        t = Trainer(cfg, ps)
        assert t.run() == 0
        ps.barrier()   # the logging rank has closed the metrics file
        out.append((run, tag, logged(argv), t.schedule.lr(t.state.iteration, t.state.tokens)))
    return out


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    """(run, layout tag) -> (what gpt3d logged, the learning rate after iteration 6)."""
    tmp = tmp_path_factory.mktemp("mds")
    results = {}
    for world, jobs in sorted(_plan().items()):
        if world == 1:
            for run, tag, tp, pp in jobs:
                argv = continuation_argv(run, tmp, tp, pp, tag)
                assert cli_main(["train", *argv]) == 0
                results[(run, tag)] = (logged(argv), None)
        else:
            for run, tag, got, lr in distributed.run(world, _worker, jobs, str(tmp))[0]:
                results[(run, tag)] = (got, lr)
    return results


def _cases():
    return [(run, tag) for run in runs() for tag in _layouts(run)]


@pytest.mark.slow
@pytest.mark.parametrize("run, tag", _cases())
def test_gpt3d_continues_megatron_deepspeeds_run(continued, run, tag):
    got, lr_after = continued[(run, tag)]
    want = losses(run)
    bf16 = "--bf16" in command(run)
    tol = 2e-3 if bf16 else 2e-5          # bf16: its rounding; fp32: the 6 digits Megatron logs, and reductions
    rows = [f"{it}: {got['loss'].get(it)} vs {want['lm_loss'][it - 1]}" for it in (4, 5, 6)]
    for it in (4, 5, 6):
        assert got["loss"][it] == pytest.approx(want["lm_loss"][it - 1], abs=tol), f"{run} at {tag}: {rows}"
        if want["grad_norm"][it - 1] is not None:   # the pipeline engine logs it (3 decimals)
            assert got["grad_norm"][it] == pytest.approx(want["grad_norm"][it - 1], abs=2e-3 + 5 * tol), (run, it)
    # Megatron logs the learning rate the next step will use, gpt3d the one the step used
    for it in (5, 6):
        assert got["lr"][it] == pytest.approx(want["lr"][it - 2], rel=1e-3), (run, it)
    if lr_after is not None:
        assert lr_after == pytest.approx(want["lr"][5], rel=1e-3)
    assert got["val"][6] == pytest.approx(want["valid_loss"], abs=tol)


def _digests(path: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_offline_import_then_train_at_another_layout(tmp_path):
    """`gpt3d checkpoint import-megatron-deepspeed`, then `gpt3d train --config <its yaml> --load` at TP1 PP1:
    the same iterations as Megatron-DeepSpeed's; its files are untouched."""
    run = "tp2_pp2_pipe" if "tp2_pp2_pipe" in runs() else runs()[0]
    before = _digests(FIXTURES / run / "ckpt")
    out = tmp_path / "imported"
    r = subprocess.run([sys.executable, "-m", "gpt3d", "checkpoint", "import-megatron-deepspeed", "--load",
                        str(FIXTURES / run / "ckpt"), "--iteration", "3", "--save", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    data = linked_data(command(run), tmp_path / "data")
    log = tmp_path / "metrics.jsonl"
    assert cli_main(["train", "--config", str(out / "megatron_deepspeed.yaml"), "--load", str(out), "--save",
                     str(out), "--data-path", data[data.index("--data-path") + 1], "--log-file", str(log),
                     "--device", "cpu"]) == 0
    got = logged(["--log-file", str(log)])
    want = losses(run)
    tol = 2e-3 if "--bf16" in command(run) else 2e-5
    assert [got["loss"][i] for i in (4, 5, 6)] == pytest.approx(want["lm_loss"][3:6], abs=tol)
    assert _digests(FIXTURES / run / "ckpt") == before


def test_every_flag_of_the_reference_command_lines_is_accepted():
    for run in runs():
        cfg = load_config(build_parser("train").parse_args(["train", *command(run)]))
        m = cfg.model
        assert m.no_masked_softmax_fusion and m.no_bias_dropout_fusion and m.no_persist_layer_norm
        assert m.no_gradient_accumulation_fusion and cfg.parallel.no_async_tensor_model_parallel_allreduce
        assert m.gelu_approximation == "none"          # --no-bias-gelu-fusion: Megatron's exact GeLU
        assert cfg.optimizer.clip_grad == 0.0          # the ds_config has no gradient_clipping: DeepSpeed's 0


@pytest.mark.parametrize("where", ["itself", "inside"])
def test_save_into_the_megatron_deepspeed_directory_is_refused(tmp_path, where):
    """--save equal to (or inside) the Megatron-DeepSpeed directory: one error line, exit 2, not a file
    written there (the lock file included)."""
    run = runs()[0]
    src = tmp_path / "mds"
    shutil.copytree(FIXTURES / run / "ckpt", src)
    os.chmod(src, 0o755)
    before = _digests(src)
    save = src if where == "itself" else src / "gpt3d"
    argv = continuation_argv(run, tmp_path, 1, 1, "x")
    argv[argv.index("--load") + 1] = str(src / "global_step3")
    argv[argv.index("--save") + 1] = str(save)
    r = subprocess.run([sys.executable, "-m", "gpt3d", "train", *argv], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    errors = [x for x in r.stderr.splitlines() if x.startswith("gpt3d: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "never modified" in errors[0], r.stderr
    assert _digests(src) == before and not (src / ".lock").exists() and not (src / "gpt3d").exists()


@pytest.mark.parametrize("flags, says", [
    (["--num-layers", "4"], "checkpoint model has num_layers=2 but this run has 4: incompatible model shape"),
    (["--padded-vocab-size", "1024"], "vocabulary rows"),
    (["--seq-length", "32"], "would change the data stream: --seq-length 64 -> 32"),
])
def test_a_run_that_does_not_fit_the_checkpoint_is_refused_before_converting(tmp_path, capsys, flags, says):
    """A model shape, vocabulary or data stream that differs from the Megatron-DeepSpeed run's: one error line,
    exit 2, and nothing converted into --save (a later, corrected run can still import it)."""
    run = runs()[0]
    argv = continuation_argv(run, tmp_path, 1, 1, "x")
    assert cli_main(["train", *argv, *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("gpt3d: error:") == 1
    save = Path(argv[argv.index("--save") + 1])
    assert sorted(p.name for p in save.iterdir()) == [".lock"]
