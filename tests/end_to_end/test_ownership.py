"""One run owns its --save directory (row: two runs with one --save both died with a misleading I/O error and
the directory mixed checkpoints of two runs)."""
from __future__ import annotations

import json
import os
import signal

import pytest

from gpt3d.checkpoint import lock_save_dir
from gpt3d.parallel.state import ParallelState

from tests.support import runs

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def test_a_second_run_fails_at_start_and_touches_nothing(tmp_path, capsys):
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    assert runs.train("--train-iters", "2", "--save", str(ck), "--log-file", str(log)) == 0
    held = lock_save_dir(str(ck), ParallelState.single())   # another run, as far as the lock file can tell
    try:
        before, lock_text = runs.snapshot(tmp_path), (ck / ".lock").read_text()
        capsys.readouterr()
        rc = runs.train("--train-iters", "4", "--save", str(ck), "--load", str(ck), "--log-file", str(log))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith(f"gpt3d: error: --save {ck} is in use by another run (pid {os.getpid()} on ")
        assert runs.snapshot(tmp_path) == before and (ck / ".lock").read_text() == lock_text
    finally:
        held.release()
    assert runs.train("--train-iters", "4", "--save", str(ck), "--load", str(ck), "--log-file", str(log)) == 0
    assert sorted(os.listdir(ck)) == [".lock", "iter_0000002", "iter_0000004", "latest"]


def test_a_run_refused_by_the_lock_creates_no_log_file(tmp_path, capsys):
    """Row: a run refused by the lock left a new, empty --log-file behind; the metrics file and TensorBoard
    directory are created only once the run is accepted."""
    ck = tmp_path / "ck"
    held = lock_save_dir(str(ck), ParallelState.single())
    try:
        capsys.readouterr()
        rc = runs.train("--train-iters", "2", "--save", str(ck), "--log-file", str(tmp_path / "runs" / "new.jsonl"),
                    "--tensorboard-dir", str(tmp_path / "tb"))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "is in use by another run" in err[0], err
        assert sorted(os.listdir(tmp_path)) == ["ck"] and os.listdir(ck) == [".lock"]
    finally:
        held.release()


def test_an_unwritable_log_file_fails_before_the_lock(tmp_path, capsys):
    """With the sinks opened late, their paths are still checked at start, creating nothing (no --save dir)."""
    (tmp_path / "file").write_text("x")
    for flags, message in ((["--log-file", str(tmp_path / "file" / "m.jsonl")], f"{tmp_path / 'file'} is not a "
                            "directory"), (["--tensorboard-dir", str(tmp_path / "file")], "is not a directory")):
        capsys.readouterr()
        assert runs.train("--train-iters", "2", "--save", str(tmp_path / "ck"), *flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert sorted(os.listdir(tmp_path)) == ["file"]


def test_lock_of_a_live_run_then_of_a_killed_one(tmp_path, capsys):
    """A real second process: refused while the first trains (its pid in the message); after kill -9 the
    stale .lock file is no obstacle (the kernel dropped the lock with the process)."""
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    first = runs.spawn("--train-iters", "100000", "--save", str(ck), "--save-interval", "1000", "--log-file", str(log))
    try:
        runs.wait_for(lambda: log.exists() and runs.last_iteration(log) >= 1, first)
        assert json.loads((ck / ".lock").read_text())["pid"] == first.pid
        capsys.readouterr()
        assert runs.train("--train-iters", "2", "--save", str(ck)) == 2
        assert f"is in use by another run (pid {first.pid} on " in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert (ck / ".lock").exists()
    assert runs.train("--train-iters", "2", "--save", str(ck)) == 0
    assert sorted(os.listdir(ck)) == [".lock", "iter_0000002", "latest"]


def test_the_lock_goes_with_the_run(tmp_path):
    """Released at the end (also of a failed run), so the next run of one script can save there."""
    ck = tmp_path / "ck"
    assert runs.train("--train-iters", "1", "--save", str(ck)) == 0
    assert runs.train("--train-iters", "1", "--save", str(ck), "--adam-eps", "0") == 2   # fails before the lock
    assert runs.train("--train-iters", "2", "--save", str(ck), "--load", str(ck), "--hidden-size", "64") == 2  # after
    held = lock_save_dir(str(ck), ParallelState.single())
    held.release()


def test_first_run_of_save_and_load_on_a_missing_dir_starts_fresh(tmp_path, capsys):
    """Row: the README's torchrun example (`--save ckpt --load ckpt`) failed on its first run, `ckpt` not
    existing yet. The run takes its --save lock first (creating the directory), finds no checkpoint there
    and starts from scratch with a warning; the second run resumes."""
    ck = tmp_path / "ckpt"
    assert runs.train("--train-iters", "2", "--save", str(ck), "--load", str(ck)) == 0
    assert f"--load {ck} holds no checkpoint yet: starting from scratch" in capsys.readouterr().err
    assert runs.train("--train-iters", "3", "--save", str(ck), "--load", str(ck)) == 0
    assert f"loaded checkpoint {ck / 'iter_0000002'}" in capsys.readouterr().out
