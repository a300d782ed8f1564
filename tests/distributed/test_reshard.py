"""Save at TP2 x PP2 x DP2 (8 ranks), resume at other layouts: the curve continues the unbroken one."""
from __future__ import annotations

import subprocess
import sys

from gpt3d.errors import CheckpointError
import pytest

from tests.support import distributed
from tests.support.curves import resume_worker, run_curve, save_worker, tiny_config

THREE_D = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True)


@pytest.mark.slow
def test_save_3d_resume_anywhere(tmp_path):
    path = str(tmp_path / "ck")
    unbroken = run_curve(tiny_config())
    saved = [x for x in distributed.run(8, save_worker, THREE_D, path, 6) if x is not None][0]
    assert saved == pytest.approx(unbroken["losses"][:6], abs=1e-3)
    single = resume_worker(0, 1, {}, path)             # TP1 x PP1 x DP1, in this process
    tp2dp2 = [x for x in distributed.run(4, resume_worker, dict(tensor_model_parallel_size=2), path)
              if x is not None][0]
    for name, got in (("TP1xPP1xDP1", single), ("TP2xPP1xDP2", tp2dp2)):
        assert len(got["losses"]) == 6
        for i, (a, b) in enumerate(zip(got["losses"], unbroken["losses"][6:])):
            assert abs(a - b) <= 1e-3, f"{name}: resumed iteration {7 + i} loss {a} vs unbroken {b}"
        assert abs(got["val"] - unbroken["val"]) <= 1e-3
    info = subprocess.run([sys.executable, "-m", "gpt3d", "checkpoint-info", path], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "layout: TP=2 PP=2 DP=2 ZeRO-1" in info.stdout and "iteration: 6" in info.stdout


def test_incomplete_checkpoint_is_skipped(tmp_path):
    from gpt3d import checkpoint
    from tests.support.curves import make_trainer
    cfg = tiny_config(save=str(tmp_path / "ck"))
    t = make_trainer(cfg)
    run_curve(cfg, iters=2, trainer=t)
    t.save()
    run_curve(cfg, iters=2, trainer=t)
    t.save()
    newest = tmp_path / "ck" / "iter_0000004"
    victim = next(newest.glob("optim_*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:100])      # truncated, as by a crash mid-write
    assert checkpoint.resolve(str(tmp_path / "ck")).endswith("iter_0000002")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "iter_0000001").mkdir()        # no meta.json: never loaded
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "bad"))


@pytest.mark.slow
def test_save_single_resume_pipelined(tmp_path):
    """A PP=1 checkpoint has no separate output layer: the last stage's tied copy must come from the embedding."""
    path = str(tmp_path / "ck")
    unbroken = run_curve(tiny_config())
    saved = save_worker(0, 1, {}, path, 6)
    assert saved == pytest.approx(unbroken["losses"][:6], abs=1e-6)
    got = [x for x in distributed.run(2, resume_worker, dict(pipeline_model_parallel_size=2), path)
           if x is not None][0]
    for i, (a, b) in enumerate(zip(got["losses"], unbroken["losses"][6:])):
        assert abs(a - b) <= 1e-3, f"PP=2 resumed iteration {7 + i} loss {a} vs unbroken {b}"
