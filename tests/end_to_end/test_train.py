"""Foundation: CLI/config errors, learning on real text, exact resume, fp16 overflow skip, metrics."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from gpt3d.cli import build_parser
from gpt3d.config.load import load_config
from gpt3d.errors import ConfigError

from tests.support import ROOT
from tests.support.curves import make_trainer, run_curve, tiny_config


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gpt3d", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("flags,message", [
    (["--global-batch-size", "6", "--micro-batch-size", "4"], "--global-batch-size (6) must be divisible"),
    (["--seq-length", "128", "--max-position-embeddings", "64"], "--seq-length (128) exceeds"),
    (["--hidden-size", "30", "--num-attention-heads", "4"], "--num-attention-heads (4) must divide --hidden-size"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "need 0 <= --min-lr"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1)"),
])
def test_inconsistent_flags_fail_with_one_line(flags, message):
    r = _cli("train", "--mock-data", "--train-iters", "1", *flags)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_unknown_flag_and_config_typo(tmp_path):
    r = _cli("train", "--num-layer", "2", "--mock-data", "--train-iters", "1")
    assert r.returncode == 2 and "unrecognized arguments: --num-layer" in r.stderr
    (tmp_path / "c.yaml").write_text("model:\n  hiden_size: 64\n")
    r = _cli("train", "--config", str(tmp_path / "c.yaml"))
    assert r.returncode == 2 and "unknown setting 'hiden_size'" in r.stderr and "hidden_size" in r.stderr


def test_world_size_must_divide_tp_pp():
    cfg = tiny_config(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match="world size 6 is not divisible by TP x PP = 2 x 2"):
        cfg.validate(world_size=6)


@pytest.mark.parametrize("overrides,message", [
    (dict(accumulate_allreduce_grads_in_fp32=False), "--no-accumulate-allreduce-grads-in-fp32 is not supported"),
    (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_split="1,3",
          num_layers_per_virtual_pipeline_stage=1), "are exclusive"),
])
def test_unsupported_combinations_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides).validate(world_size=2)


def test_yaml_then_flags_override(tmp_path):
    (tmp_path / "c.yaml").write_text("num_layers: 3\ntraining:\n  micro_batch_size: 5\nlr: 0.1\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--lr", "0.2",
                                      "--data-path", "0.3", "a", "0.7", "b"])
    cfg = load_config(args)
    assert (cfg.model.num_layers, cfg.training.micro_batch_size, cfg.scheduler.lr) == (3, 5, 0.2)
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]


def _unigram_entropy(prefix: str) -> float:
    """Nats per token of the data's token frequencies: the loss of a model that learned nothing but counts."""
    import numpy as np

    from gpt3d.data.indexed import MMapIndexedDataset
    ds = MMapIndexedDataset(prefix)
    counts = np.bincount(np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_tiny_config_learns_real_text(text_prefix, bpe, tmp_path):
    """The issue's bar: 4 layers, hidden 64, seq 64, English-like text through a trained BPE, 40 CPU iterations,
    loss down > 2 nats (and below the text's unigram entropy, so more than token frequencies was learned)."""
    log = tmp_path / "m.jsonl"
    r = _cli("train", "--config", "configs/tiny.yaml", "--no-mock-data", "--data-path", text_prefix,
             "--vocab-file", str(bpe.vocab), "--merge-file", str(bpe.merges), "--train-iters", "40",
             "--log-interval", "1",
             "--eval-interval", "40", "--log-file", str(log), "--device", "cpu",
             cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    train = [x for x in rows if "loss" in x]
    assert len(train) == 40
    for key in ("iteration", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "tflops_per_gpu_6n",
                "mfu"):
        assert key in train[0]
    assert train[0]["loss"] - train[-1]["loss"] > 2.0, (train[0]["loss"], train[-1]["loss"])
    assert train[-1]["loss"] < _unigram_entropy(text_prefix), (train[-1]["loss"], _unigram_entropy(text_prefix))
    val = [x for x in rows if "val_loss" in x]
    assert val and val[-1]["val_ppl"] == pytest.approx(2.718281828 ** val[-1]["val_loss"], rel=1e-6)
    assert "tok/s" in r.stdout and "ETA" in r.stdout
    assert "TFLOPs" not in r.stdout and "MFU" not in r.stdout   # a GPU's figures: not on a CPU's lines
    # the header names the data, the layout's ZeRO as configured, and where every output goes
    assert re.search(rf"gpt3d: data: {re.escape(text_prefix)} "
                     r"\([\d,]+ tokens in [\d,]+ documents of the train split\), "
                     r"--split 969,30,1 \| tokenizer GPT2BPETokenizer: vocab.json, merges.txt\n", r.stdout), r.stdout
    assert "ZeRO-1 (no sharding at DP 1)" in r.stdout and f"metrics: {log}" in r.stdout
    assert f"curves: {tmp_path / 'm.png'} (at the end)" in r.stdout and "TensorBoard: off" in r.stdout


def test_resume_continues_the_same_curve(tmp_path):
    unbroken = run_curve(tiny_config(train_iters=8))
    cfg = tiny_config(train_iters=8, save=str(tmp_path / "ck"))
    t = make_trainer(cfg)
    first = run_curve(cfg, iters=4, trainer=t)
    t.save()
    assert (tmp_path / "ck" / "latest").read_text() == "iter_0000004"
    resumed_t = make_trainer(tiny_config(train_iters=8, load=str(tmp_path / "ck")))
    resumed_t.load(str(tmp_path / "ck"))
    assert resumed_t.state.iteration == 4 and resumed_t.state.consumed_samples == 32
    rest = run_curve(resumed_t.cfg, trainer=resumed_t)
    assert first["losses"] + rest["losses"] == pytest.approx(unbroken["losses"], abs=1e-6)
    assert rest["val"] == pytest.approx(unbroken["val"], abs=1e-6)


def test_fp16_overflow_step_is_skipped():
    cfg = tiny_config(fp16=True, initial_loss_scale=2.0 ** 40, hysteresis=1, train_iters=60)
    t = make_trainer(cfg)
    train_ds, _, _ = t.build_datasets()
    from gpt3d.data.sampler import build_data_loader
    it = iter(build_data_loader(train_ds, 0, 2, 0, 1))
    before = [p.detach().clone() for p in t.model[0].parameters()]
    r = t.train_step(t.microbatches(it))
    assert bool(r.skipped) and not torch.isfinite(r.grad_norm).all()
    assert all(torch.equal(a, p) for a, p in zip(before, t.model[0].parameters()))
    assert float(t.scaler.scale) == 2.0 ** 39
    for _ in range(50):  # the scale keeps halving until steps succeed
        r = t.train_step(t.microbatches(it))
        if not bool(r.skipped):
            break
    assert not bool(r.skipped) and torch.isfinite(r.grad_norm).all() and float(t.scaler.scale) < 2.0 ** 39
    assert any(not torch.equal(a, p) for a, p in zip(before, t.model[0].parameters()))


def test_fault_hook_is_installed_only_when_asked(monkeypatch):
    """GPT3D_FAULT_INJECT wraps the step at start-up; without it the step is the plain method."""
    monkeypatch.delenv("GPT3D_FAULT_INJECT", raising=False)
    t = make_trainer(tiny_config())
    assert "train_step" not in vars(t) and "finish_grad_sync" not in vars(t.grads)
    monkeypatch.setenv("GPT3D_FAULT_INJECT", "0:2")
    t = make_trainer(tiny_config())
    run_curve(t.cfg, iters=1, trainer=t)
    with pytest.raises(RuntimeError, match="injected fault on rank 0 at iteration 2"):
        run_curve(t.cfg, iters=1, trainer=t)
