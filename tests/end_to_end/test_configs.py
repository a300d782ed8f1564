"""Seed configs and launch scripts: every config parses through the CLI, its size matches its name, a
reduced copy trains 2 iterations, and the example scripts are valid bash that launch real (CPU) runs."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpt3d import cli
from gpt3d.config.load import load_config
from gpt3d.model.gpt import count_parameters
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState
from gpt3d.model.build import build_model_chunks

from tests.support import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SEED = [p for p in CONFIGS if p.stem != "tiny"]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".sh", ".sbatch"))
# A seed config shrunk to CPU size: only shapes, batch and length change; precision, recompute, RoPE,
# flash attention, optimizer and schedule settings stay the config's own.
REDUCED = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
           "--max-position-embeddings", "32", "--vocab-size", "256", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--mock-data", "--device", "cpu"]
GPT2_VOCAB = 50257   # the seed configs are sized with GPT-2's tokenizer (their data is GPT-2 BPE)
SHORT = ["--train-iters", "2", "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1"]


def _parse(path: Path, *flags: str):
    return load_config(cli.build_parser().parse_args(["train", "--config", str(path), *flags]))


def _size_from_name(stem: str) -> float:
    number, unit = re.search(r"(\d+(?:\.\d+)?)([MB])", stem).groups()
    return float(number) * (1e6 if unit == "M" else 1e9)


def test_seed_cases_are_all_there():
    assert {p.stem for p in SEED} >= {"gpt-125M", "gpt-125M-flash", "gpt-1.3B", "gpt-1.3B-rope", "gpt-13B"}
    assert (ROOT / "configs" / "tiny.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_validates_at_its_layout(path):
    cfg = _parse(path)
    p = cfg.parallel
    cfg.validate(world_size=p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    if path in SEED:  # the seed's token-based schedule: warm-up, then decay over the whole run
        s, t = cfg.scheduler, cfg.training
        assert s.lr_decay_tokens == t.train_tokens and 0 < s.lr_warmup_tokens < s.lr_decay_tokens
        assert s.min_lr < s.lr and cfg.precision.bf16 and cfg.data.split == "949,50,1"


@pytest.mark.parametrize("path", SEED, ids=lambda p: p.stem)
def test_parameter_count_matches_the_name(path):
    cfg = _parse(path)
    n = count_parameters(cfg.model, GPT2_VOCAB)["total"]
    print(f"{path.stem}: {n / 1e6:,.1f}M parameters")
    assert abs(n / _size_from_name(path.stem) - 1) < 0.10, n


@pytest.mark.parametrize("path", SEED, ids=lambda p: p.stem)
def test_count_parameters_is_the_built_model(path):
    """The formula the size check relies on counts what the model really holds (tied embedding, RoPE...)."""
    cfg = _parse(path, *REDUCED)
    ps = ParallelState()
    chunks = build_model_chunks(cfg, ps, seed_everything(1, ps), vocab_size=256)
    assert sum(p.numel() for c in chunks for p in c.parameters()) == count_parameters(cfg.model, 256)["total"]


@pytest.mark.parametrize("path", SEED, ids=lambda p: p.stem)
def test_seed_config_dry_run(path, tmp_path, capsys):
    """2 iterations of the config at reduced size through `gpt3d train`, one process (TP=PP=1)."""
    log, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    rc = cli.main(["train", "--config", str(path), *REDUCED, *SHORT, "--tensor-model-parallel-size", "1",
                   "--pipeline-model-parallel-size", "1", "--log-file", str(log), "--save", str(ck),
                   "--no-exit-signal-handler"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["iteration"] for r in train] == [1, 2] and all(isinstance(r["loss"], float) for r in train)
    assert any("val_loss" in r for r in rows)
    assert (ck / "latest").read_text() == "iter_0000002"
    assert (tmp_path / "m.png").stat().st_size > 0   # the trainer's end-of-run plot


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_script_is_valid_bash(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(script: str, env: dict, *flags: str, tmp: Path, first: tuple = ()) -> subprocess.CompletedProcess:
    """Run an example script as a user would, with stand-in commands from tmp/bin first on PATH."""
    path = os.pathsep.join([str(tmp / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]])
    return subprocess.run(["bash", str(ROOT / "examples" / script), *first, *REDUCED, *SHORT, *flags], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DATA": str(tmp / "none"), "PATH": path,
                               **env},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_example_scripts_launch_real_runs(tmp_path):
    """Each launcher as written, on CPU with gloo: 1 GPU (then resume), one node with the seed's TP=2 x PP=2
    layout, multi-node rendezvous (1 node, PP=2) and the SLURM file under stand-in srun/scontrol."""
    (tmp_path / "bin").mkdir()
    for name, body in {"srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',
                       "scontrol": "echo 127.0.0.1"}.items():
        (tmp_path / "bin" / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (tmp_path / "bin" / name).chmod(0o755)

    one = tmp_path / "one"
    r = _launch("train_1gpu.sh", {"CKPT": str(one)}, tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _launch("train_1gpu.sh", {"CKPT": str(one)}, "--train-iters", "3", tmp=tmp_path)
    assert r.returncode == 0 and (one / "latest").read_text() == "iter_0000003", r.stderr
    assert re.search(r"iter\s+3/3", r.stdout) and not re.search(r"iter\s+1/3", r.stdout)  # resumed at 2

    r = _launch("train_1node.sh", {"NPROC_PER_NODE": "4", "CKPT": str(tmp_path / "node")}, tmp=tmp_path)
    assert r.returncode == 0 and "TP=2 PP=2 DP=1 SP" in r.stdout, r.stderr

    r = _launch("train_multinode.sh", {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port(), "NNODES": "1",
                                       "NPROC_PER_NODE": "2", "CKPT": str(tmp_path / "multi"),
                                       "LOGDIR": str(tmp_path / "logs")},
                "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2", tmp=tmp_path)
    assert r.returncode == 0 and "TP=1 PP=2 DP=1" in r.stdout, r.stderr
    assert (tmp_path / "multi" / "latest").exists() and (tmp_path / "logs" / "node0.log").exists()
    assert (tmp_path / "logs" / "metrics.jsonl").exists()   # the launcher's log directory is the run's directory

    r = _launch("slurm.sbatch", {"SLURM_JOB_NODELIST": "n0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "7",
                                 "GPUS_PER_NODE": "2", "MASTER_PORT": _free_port(), "CKPT": str(tmp_path / "slurm")},
                "--tensor-model-parallel-size", "1", tmp=tmp_path, first=("configs/gpt-125M.yaml",))
    assert r.returncode == 0 and "TP=1 PP=2 DP=1" in r.stdout, r.stderr
    assert (tmp_path / "slurm" / "latest").read_text() == "iter_0000002"
