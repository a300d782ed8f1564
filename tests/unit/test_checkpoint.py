"""Checkpoints as stateful parts: what loads under --finetune / --no-load-optim, and that a new part only
needs save/load (its files go through the Writer and are size-checked like the others)."""
from __future__ import annotations

import pytest
import torch

from gpt3d.errors import CheckpointError
from gpt3d import checkpoint
from gpt3d.checkpoint.parts import MetaPart

from tests.support.curves import make_trainer, run_curve, tiny_config


def _saved(tmp_path, **over):
    cfg = tiny_config(save=str(tmp_path / "ck"), bf16=True, **over)
    t = make_trainer(cfg)
    run_curve(cfg, iters=3, trainer=t)
    t.save()
    return t


@pytest.mark.parametrize("flag", ["finetune", "no_load_optim"])
def test_weights_only_loads(tmp_path, flag):
    saved = _saved(tmp_path)
    t = make_trainer(tiny_config(bf16=True, **{flag: True}))
    t.load(str(tmp_path / "ck"))
    for a, b in zip(saved.model.state_dict().values(), t.model.state_dict().values()):
        assert torch.equal(a, b)
    for m, pc in zip(t.optimizer.masters, t.optimizer.pieces):   # bf16: fp32 masters follow the weights
        assert torch.equal(m.detach(), pc.param.detach().reshape(-1)[pc.lo:pc.hi].float())
    a = t.optimizer.adamw                                         # no Adam moments or step counts restored
    assert not (a.exp_avg.any() or a.exp_avg_sq.any() or a.steps.any())
    assert t.state.iteration == (0 if flag == "finetune" else 3)


class _Counter:
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


class _TensorPart:
    """A part with a file of its own."""

    def __init__(self, t):
        self.t = t

    def save(self, w):
        w.tensors("extra.safetensors", {"t": self.t})

    def load(self, r):
        from safetensors.torch import load_file
        self.t.copy_(load_file(f"{r.path}/extra.safetensors")["t"])
        return True


def test_a_new_part_is_saved_checked_and_loaded(tmp_path):
    t = make_trainer(tiny_config())
    parts = {**t.checkpoint_parts(), "counter": MetaPart(_Counter(7), "counter"),
             "extra": _TensorPart(torch.arange(4.0))}
    path = checkpoint.save(str(tmp_path / "ck"), parts, t.ps, iteration=5)
    meta = checkpoint.read_meta(path)
    assert meta["counter"] == {"n": 7} and meta["iteration"] == 0 and path.endswith("iter_0000005")
    assert meta["files"]["extra.safetensors"] > 0
    counter, extra = _Counter(), _TensorPart(torch.zeros(4))
    loaded = checkpoint.load(str(tmp_path / "ck"), {**t.checkpoint_parts(), "counter": MetaPart(counter, "counter"),
                                                   "extra": extra}, t.ps, skip=frozenset({"rng"}))
    assert counter.n == 7 and torch.equal(extra.t, torch.arange(4.0))
    assert loaded.parts == {"model", "optimizer", "train", "counter", "extra"}
    (tmp_path / "ck" / "iter_0000005" / "extra.safetensors").write_bytes(b"x")   # truncated: not loaded
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "ck"))


def test_resume_with_other_data_settings_is_refused(tmp_path, capsys):
    _saved(tmp_path)
    same = make_trainer(tiny_config(bf16=True))
    same.load(str(tmp_path / "ck"))
    assert "warning" not in capsys.readouterr().err
    other = make_trainer(tiny_config(bf16=True, seed=8))
    with pytest.raises(CheckpointError, match="would change the data stream: --seed 7 -> 8"):
        other.load(str(tmp_path / "ck"))
    forced = make_trainer(tiny_config(bf16=True, seed=8, override_data_state=True))
    forced.load(str(tmp_path / "ck"))
    assert "--override-data-state: the data stream changed (--seed 7 -> 8)" in capsys.readouterr().err
    assert forced.state.iteration == 3 and forced.state.data_state["seed"] == 8
