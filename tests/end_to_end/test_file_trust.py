"""Files gpt3d reads are data, never code, and files it writes never go through a planted link (issue 24).

One test per class of fault, each driving the real commands (in-process `gpt3d.cli.main`):

* no code runs from a file: nothing is unpickled (RNG state is safetensors; an older checkpoint's
  rng_rank*.pt is read weights-only: a genuine one resumes bit for bit, a planted pickle is refused and
  never runs), and nothing meta.json does not list is opened (any other file makes the checkpoint bad);
* writes never follow a planted symlink or hard link and never delete what gpt3d did not create; files
  are created with the user's umask;
* one save per iteration, a stop signal at a save interval included.

docs/faults.md's "Faults tried" table has a row per test.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import stat
import string
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt3d.errors import CheckpointError
from gpt3d import checkpoint
from gpt3d.cli import main as cli_main
from gpt3d.parallel.random import from_tensors

from tests.support import runs
from tests.support.fuzz import fuzz
from tests.support.hostile import reseal

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")   # @record under capsys


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """iter_0000002 and iter_0000004 of the tiny run (dropout on: a resume needs its RNG state)."""
    root = tmp_path_factory.mktemp("trust")
    assert runs.train("--train-iters", "4", "--save", str(root / "ck"), "--save-interval", "2") == 0
    return root / "ck"


@pytest.fixture
def ck(saved, tmp_path) -> Path:
    shutil.copytree(saved, tmp_path / "ck")
    return tmp_path / "ck"


class _Plant:
    """A pickle that, if unpickled, creates the file `marker` (code running from a checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt3d: error: "), err
    return err[0]


def test_no_code_runs_from_a_checkpoint(ck, tmp_path, capsys):
    """Row: a checkpoint's rng_rank0.pt replaced by a pickle that writes a file, meta.json re-sealed: train
    --load ran the planted code. RNG state is safetensors now; an older checkpoint's genuine rng_rank0.pt
    still resumes bit for bit (read weights-only), a planted one is refused with one line and never runs."""
    it4 = ck / "iter_0000004"
    assert sorted(p.name for p in it4.iterdir() if p.suffix not in (".json",)) == \
        ["model_tp0_pp0.safetensors", "optim_tp0_pp0_dp0.safetensors", "rng_rank0.safetensors"]
    new_log, old_log = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    assert runs.train("--train-iters", "6", "--load", str(ck), "--log-file", str(new_log)) == 0

    from safetensors import safe_open   # the older format: the same state as a torch.save pickle
    with safe_open(str(it4 / "rng_rank0.safetensors"), framework="pt") as f:
        state = from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    torch.save(state, it4 / "rng_rank0.pt")
    reseal(it4, add={"rng_rank0.pt": it4 / "rng_rank0.pt"}, drop=("rng_rank0.safetensors",))
    (it4 / "rng_rank0.safetensors").unlink()
    assert runs.train("--train-iters", "6", "--load", str(ck), "--log-file", str(old_log)) == 0
    assert runs.losses(old_log) == runs.losses(new_log) and sorted(runs.losses(new_log)) == [5, 6]

    marker = tmp_path / "planted-code-ran"
    torch.save(_Plant(marker), it4 / "rng_rank0.pt")
    reseal(it4, add={"rng_rank0.pt": it4 / "rng_rank0.pt"})
    assert cli_main(["checkpoint", "verify", str(it4)]) == 0   # its checksum matches: verify cannot tell
    capsys.readouterr()
    before = runs.snapshot(tmp_path)
    assert runs.train("--train-iters", "6", "--load", str(ck), "--save", str(ck)) == 2
    line = _error_line(capsys)
    assert f"{it4 / 'rng_rank0.pt'}: refused: not plain tensors and arrays" in line, line
    assert not marker.exists() and runs.snapshot(tmp_path) == before


LISTED = (".", "..", "meta.json", "model_tp0_pp0.safetensors", "optim_tp0_pp0_dp0.safetensors", "rng_rank0.safetensors")


@fuzz(25)
@given(name=st.one_of(
    st.sampled_from(["model_tp0_pp1.safetensors", "rng_rank0.pt", "optim_tp0_pp0_dp1.safetensors",
                     "tokenizer/vocab.json", ".nfs0001", "sub/dir/x.bin"]),
    st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12).filter(
        lambda s: s not in LISTED)),
    content=st.sampled_from(["shard", "pickle", "empty"]))
def test_only_files_meta_json_lists_are_opened(saved, tmp_path_factory, name, content):
    """Row: a stray model_tp0_pp1.safetensors from another run (or an unlisted rng_rank0.pt pickle) copied
    into an iteration directory: verify said ok and train/eval/export-hf loaded it. Any entry that meta.json
    does not list makes the checkpoint bad, named by `checkpoint verify`; it is never opened."""
    path = tmp_path_factory.mktemp("stray") / "iter_0000004"
    shutil.copytree(saved / "iter_0000004", path)
    stray = path / name
    stray.parent.mkdir(parents=True, exist_ok=True)
    marker = path.parent / "planted-code-ran"
    if content == "shard":
        shutil.copyfile(path / "model_tp0_pp0.safetensors", stray)
    elif content == "pickle":
        buf = io.BytesIO()
        torch.save(_Plant(marker), buf)
        stray.write_bytes(buf.getvalue())
    else:
        stray.write_bytes(b"")
    first = name.split("/")[0]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli_main(["checkpoint", "verify", str(path)]) == 2
    assert out.getvalue().startswith(f"BAD  {path}: {first}") and "is not listed in meta.json" in out.getvalue()
    with pytest.raises(CheckpointError, match="is not listed in meta.json"):
        checkpoint.resolve(str(path), fallback=False)
    assert not marker.exists()
    shutil.rmtree(path.parent)


@pytest.mark.parametrize("command", [
    lambda ck, out: ["eval", "--load", str(ck), "--text-file", str(ck / "latest")],
    lambda ck, out: ["export-hf", "--load", str(ck), "--output", str(out / "hf")],
    lambda ck, out: ["train", *runs.TINY, "--load", str(ck), "--train-iters", "6"],
], ids=["eval", "export-hf", "train"])
def test_a_stray_shard_is_never_loaded(ck, tmp_path, capsys, command):
    """Row: eval, export-hf and train silently loaded an unlisted model_tp0_pp1.safetensors instead of the
    verified weights. eval and export-hf refuse the checkpoint with one line naming the file; train skips it
    with a warning naming it and resumes from the previous good one."""
    shutil.copyfile(ck / "iter_0000002" / "model_tp0_pp0.safetensors",
                    ck / "iter_0000004" / "model_tp0_pp1.safetensors")
    capsys.readouterr()
    before = runs.snapshot(tmp_path)
    rc = cli_main(command(ck, tmp_path))
    if command(ck, tmp_path)[0] == "train":
        assert rc == 0
        out = capsys.readouterr()
        assert f"skipping checkpoint {ck / 'iter_0000004'}: model_tp0_pp1.safetensors is not listed" in out.err
        assert f"loaded checkpoint {ck / 'iter_0000002'}" in out.out
    else:
        assert rc == 2
        assert "iter_0000004 is unusable: model_tp0_pp1.safetensors is not listed in meta.json" in \
            _error_line(capsys)
        assert runs.snapshot(tmp_path) == before


def test_writes_never_follow_a_planted_link(tmp_path, capsys):
    """Rows: a symlink planted at SAVE/.lock or SAVE/latest.tmp pointing outside: the outside file was
    overwritten. The lock is opened without following links (a symlink or hard link there is refused with
    one line); the tracker and every temporary get fresh names, created exclusively, so `latest.tmp` is never
    touched and a link at `latest` itself is replaced, not written through."""
    outside = tmp_path / "precious.txt"
    outside.write_text("mine")
    ck = tmp_path / "ck"
    ck.mkdir()
    for plant in (lambda p: os.symlink(outside, p), lambda p: os.link(outside, p)):
        plant(ck / ".lock")
        capsys.readouterr()
        assert runs.train("--train-iters", "1", "--save", str(ck)) == 2
        assert f"{ck / '.lock'} is " in _error_line(capsys) and outside.read_text() == "mine"
        assert os.listdir(ck) == [".lock"]
        (ck / ".lock").unlink()
    os.symlink(outside, ck / "latest.tmp")
    os.symlink(outside, ck / "latest")
    assert runs.train("--train-iters", "2", "--save", str(ck), "--save-interval", "1") == 0
    assert outside.read_text() == "mine" and os.path.islink(ck / "latest.tmp")
    assert not os.path.islink(ck / "latest") and (ck / "latest").read_text() == "iter_0000002"


def test_nothing_gpt3d_did_not_create_is_deleted(tmp_path, capsys):
    """Row: a directory `model.tmp` of the user's beside `export-hf --output model` was deleted without a
    word. Temporaries get fresh names beside their target and only they are removed; a save never replaces
    an iter_XXXXXXX that is not a checkpoint, and --keep-last prunes only checkpoints."""
    ck = tmp_path / "ck"
    (ck / "iter_0000001").mkdir(parents=True)          # a user's directory with a checkpoint's name
    (ck / "iter_0000001" / "notes.txt").write_text("mine")
    (ck / "iter_0000003.tmp-notes").write_text("mine")   # not a temporary of gpt3d's
    assert runs.train("--train-iters", "3", "--save", str(ck), "--save-interval", "1", "--keep-last", "1") == 2
    assert "iter_0000001 exists and is not a checkpoint gpt3d wrote" in _error_line(capsys)
    (ck / "iter_0000001" / "notes.txt").rename(tmp_path / "notes.txt")
    (ck / "iter_0000001").rmdir()
    (ck / "iter_0000000").mkdir()                        # no meta.json: not a checkpoint, never pruned
    assert runs.train("--train-iters", "3", "--save", str(ck), "--save-interval", "1", "--keep-last", "1") == 0
    assert runs.checkpoints(ck) == ["iter_0000000", "iter_0000003", "iter_0000003.tmp-notes", "latest"]
    user_tmp = tmp_path / "model.tmp"
    user_tmp.mkdir()
    (user_tmp / "weights.bin").write_text("mine")
    assert cli_main(["export-hf", "--load", str(ck), "--output", str(tmp_path / "model")]) == 0
    assert (user_tmp / "weights.bin").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["ck", "model", "model.tmp", "notes.txt"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_files_are_created_with_the_users_umask(tmp_path, mask):
    """Row: weights and exports were 0600 (safetensors' own mode), unreadable to teammates on a shared
    cluster. Every file a save or an export creates has 0666 less the umask, directories 0777 less it."""
    old = os.umask(mask)
    try:
        assert runs.train("--train-iters", "1", "--save", str(tmp_path / "ck")) == 0
        assert cli_main(["export-hf", "--load", str(tmp_path / "ck"), "--output", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    made = [p for p in (tmp_path / "ck").rglob("*")] + [p for p in (tmp_path / "hf").rglob("*")]
    assert len(made) > 6
    for p in made:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_one_save_per_iteration_with_a_stop_signal(tmp_path, capsys, monkeypatch):
    """Row: SIGTERM with --save-interval 1 saved the last iteration twice inside the preemption grace
    period. The signal arrives during iteration 3: it is saved once, and the run exits 0."""
    from gpt3d.train import loop
    saves = []
    real_save, real_step = loop.ckpt.save, loop.Trainer.train_step

    def counting_save(root, parts, ps, iteration, keep_last=None):
        saves.append(iteration)
        return real_save(root, parts, ps, iteration, keep_last=keep_last)

    def step(self, microbatches):
        if self.state.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)   # the handler only sets a flag: the step finishes
        return real_step(self, microbatches)

    monkeypatch.setattr(loop.ckpt, "save", counting_save)
    monkeypatch.setattr(loop.Trainer, "train_step", step)
    assert runs.train("--train-iters", "100", "--save", str(tmp_path / "ck"), "--save-interval", "1") == 0
    assert saves == [1, 2, 3], saves
    out = capsys.readouterr().out
    assert out.count("saved checkpoint at iteration 3 ") == 1 and "stop signal received at iteration 3" in out


def test_a_killed_preprocess_leaves_only_what_its_next_run_removes(tmp_path):
    """Row: a preprocess killed with -9 left its temporary files behind forever. Its index spill files have
    no name; its .bin/.idx temporaries are removed by the next run of the same output on this host, which
    touches nothing else: another host's or a live process's temporaries, a user's `*.tmp` file. (Killed
    once both temporaries exist, while it reads a 45 MB input.)"""
    import subprocess
    import sys

    from tests.support import ROOT
    line = '{"text": "' + " ".join(str(i % 97) for i in range(200)) + '"}\n'
    (tmp_path / "in.jsonl").write_text(line * 60000)   # 45 MB: seconds of work, killed long before the end
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gpt3d", "preprocess", "--input", str(tmp_path / "in.jsonl"),
                             "--output-prefix", str(out), "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"],
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def temporaries() -> list:
        return sorted(n for n in os.listdir(tmp_path) if n.startswith(".out_text_document."))
    runs.wait_for(lambda: len(temporaries()) == 2, proc)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    left = temporaries()
    assert [n.split(".tmp-")[0] for n in left] == [".out_text_document.bin", ".out_text_document.idx"], left
    assert sorted(os.listdir(tmp_path)) == sorted(left + ["in.jsonl"])   # spill files: nameless
    foreign = [".out_text_document.bin.tmp-otherhost-12345-0123abcd", "out_text_document.bin.tmp",
               f".out_text_document.idx{left[1][len('.out_text_document.idx'):].rsplit('-', 2)[0]}-1-0123abcd"]
    for name in foreign:   # another host's, a user's, and one of a live process (pid 1) of this host
        (tmp_path / name).write_text("not yours")
    (tmp_path / "in.jsonl").write_text('{"text": "4 5 6"}\n')
    assert cli_main(["preprocess", "--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(out),
                     "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(foreign + ["in.jsonl", "out_text_document.bin",
                                                             "out_text_document.idx"])
