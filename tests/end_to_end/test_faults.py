"""Faults a long pretraining run meets, each injected for real; docs/faults.md's "Faults tried" table lists them.

Real kills and signals go to a `python -m gpt3d train` subprocess; everything
else runs `gpt3d.cli.main` in this process (same code path, no torch import); both through
tests/support/runs.py. Bad input (one error line, nothing touched) is in test_bad_input.py.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpt3d import checkpoint

from tests.support import ROOT, runs
from tests.support.curves import make_trainer, run_curve, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")   # @record under capsys


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> dict:
    log = tmp_path_factory.mktemp("unbroken") / "m.jsonl"
    assert runs.train("--train-iters", "30", "--log-file", str(log)) == 0
    return runs.losses(log)


def _kill_then_resume(tmp_path: Path, unbroken: dict, save_interval: int, kill_when) -> tuple[Path, str]:
    """SIGKILL a 400-iteration run when `kill_when(ck, log)` holds, resume to 30 iterations, compare."""
    ck, log = tmp_path / "ck", tmp_path / "killed.jsonl"
    proc = runs.spawn("--train-iters", "400", "--save", str(ck), "--save-interval", str(save_interval),
                  "--log-file", str(log))
    runs.wait_for(lambda: kill_when(ck, log), proc)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    state = " ".join(sorted(os.listdir(ck)))
    loaded = checkpoint.resolve(str(ck))
    start = checkpoint.read_meta(loaded)["iteration"]
    assert 0 < start < 30, state
    killed = runs.losses(log)
    for it, loss in killed.items():
        if it <= 30:
            assert abs(loss - unbroken[it]) <= 1e-5, f"killed run, iteration {it}"
    resumed_log = tmp_path / "resumed.jsonl"
    assert runs.train("--train-iters", "30", "--load", str(ck), "--save", str(ck), "--save-interval",
                  str(save_interval), "--log-file", str(resumed_log)) == 0
    resumed = runs.losses(resumed_log)
    assert sorted(resumed) == list(range(start + 1, 31))
    for it, loss in resumed.items():
        assert abs(loss - unbroken[it]) <= 1e-5, f"resumed from {start}: iteration {it} {loss} vs {unbroken[it]}"
    return ck, state


@pytest.mark.slow
def test_kill9_mid_run_resumes_the_unbroken_curve(tmp_path, unbroken):
    _kill_then_resume(tmp_path, unbroken, 5, lambda ck, log: runs.last_iteration(log) >= 12)


@pytest.mark.slow
def test_kill9_while_saving_resumes_the_unbroken_curve(tmp_path, unbroken):
    """Killed the moment a checkpoint's temporary directory (.iter_XXXXXXX.tmp-...) appears (a save in
    progress)."""
    def saving(ck: Path, log: Path) -> bool:
        return ck.is_dir() and any(re.fullmatch(r"\.iter_\d+\.tmp-.+", n) and n >= ".iter_0000004"
                                      for n in os.listdir(ck))
    ck, state = _kill_then_resume(tmp_path, unbroken, 1, saving)
    assert not [n for n in os.listdir(ck) if ".tmp" in n], "the next save removes leftovers of the killed one"


def test_truncated_checkpoint_is_skipped_with_a_warning(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert runs.train("--train-iters", "4", "--save", str(ck), "--save-interval", "2") == 0
    victim = next((ck / "iter_0000004").glob("model_*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-7])
    capsys.readouterr()
    assert runs.train("--train-iters", "5", "--load", str(ck)) == 0
    out = capsys.readouterr()
    assert re.search(r"warning: skipping checkpoint .*iter_0000004: .*truncated", out.err), out.err
    assert "loaded checkpoint" in out.out and "iteration 2" in out.out


def test_keep_last_retention(tmp_path):
    ck = tmp_path / "ck"
    (ck / "iter_0000001.tmp").mkdir(parents=True)      # leftover of a save killed mid-write
    (ck / "iter_0000099").mkdir()                      # another timeline's newer checkpoint: not ours to delete
    assert runs.train("--train-iters", "5", "--save", str(ck), "--save-interval", "1", "--keep-last", "2") == 0
    assert runs.checkpoints(ck) == ["iter_0000004", "iter_0000005", "iter_0000099", "latest"]
    assert (ck / "latest").read_text() == "iter_0000005"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits_0(tmp_path, sig):
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    proc = runs.spawn("--train-iters", "100000", "--save", str(ck), "--log-file", str(log))
    runs.wait_for(lambda: runs.last_iteration(log) >= 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    last = runs.last_iteration(log)
    assert (ck / "latest").read_text() == f"iter_{last:07d}"       # the step in flight finished and was saved
    assert checkpoint.read_meta(checkpoint.resolve(str(ck)))["iteration"] == last
    assert f"stop signal received at iteration {last}: saving and exiting" in out


def test_exit_duration_saves_and_exits_0(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert runs.train("--train-iters", "100000", "--save", str(ck), "--exit-duration-in-mins", "0.002") == 0
    it = checkpoint.read_meta(checkpoint.resolve(str(ck)))["iteration"]
    assert 0 < it < 100000
    assert f"--exit-duration-in-mins 0.002 reached at iteration {it}: saving and exiting" in capsys.readouterr().out


def _stopped_iterations(err: str) -> tuple[int, int]:
    line = err.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("gpt3d: error: non-finite loss or gradients at iteration"), err
    m = re.search(r"iterations? (\d+)(?:-(\d+))?", line[0])
    return int(m.group(1)), int(m.group(2) or m.group(1))


@pytest.mark.parametrize("precision,flags,first,last", [
    ("fp32", ["--max-skipped-steps", "3"], 4, 6),
    ("bf16", ["--bf16", "--max-skipped-steps", "3"], 4, 6),
    ("check", ["--check-for-nan-in-loss-and-grad"], 4, 4),
])
def test_non_finite_steps_stop_naming_the_iteration(tmp_path, capsys, monkeypatch, precision, flags, first, last):
    """Gradients go NaN from iteration 4: skipped, then the run stops; the last good checkpoint is kept."""
    ck = tmp_path / "ck"
    monkeypatch.setenv("GPT3D_FAULT_INJECT", "0:4:nan")
    rc = runs.train("--train-iters", "20", "--save", str(ck), "--save-interval", "2", *flags)
    err = capsys.readouterr().err
    assert rc == 3
    assert _stopped_iterations(err) == (first, last)
    assert f"last good checkpoint: {ck / 'iter_0000002'}" in err
    assert runs.checkpoints(ck) == ["iter_0000002", "latest"] and (ck / "latest").read_text() == "iter_0000002"


@pytest.mark.parametrize("flags,first,last", [(["--max-skipped-steps", "3"], 5, 7),
                                               (["--check-for-nan-in-loss-and-grad"], 5, 5)])
def test_stop_read_between_log_lines_names_the_same_iterations(tmp_path, capsys, monkeypatch, flags, first, last):
    """Between log lines the stop check is read one step late (no host sync per step): a run that diverges
    there still names the iterations where it diverged, saves nothing after them and writes no later row."""
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    monkeypatch.setenv("GPT3D_FAULT_INJECT", "0:5:nan")
    rc = runs.train("--train-iters", "20", "--log-interval", "10", "--save", str(ck), "--save-interval", "2",
                "--log-file", str(log), *flags)
    err = capsys.readouterr().err
    assert rc == 3
    assert _stopped_iterations(err) == (first, last)        # 7 and 5 are read late: no log line, no save there
    assert f"last good checkpoint: {ck / 'iter_0000004'}" in err
    assert runs.checkpoints(ck) == ["iter_0000002", "iter_0000004", "latest"]   # 6 was bad: not saved
    assert not log.exists() or runs.last_iteration(log) == 0


def test_stop_signal_read_late_acts_at_the_next_step():
    """A signal seen by a check left unread stops the run one step later, where the check is read exactly."""
    from gpt3d.parallel.state import ParallelState
    from gpt3d.train.stop import StopPolicy
    cfg = tiny_config().training
    stop = StopPolicy(cfg, ParallelState(), fp16=False)
    assert stop.check(1, exact=False) is None and stop.settle().reason is None
    assert stop.check(2, exact=False) is None
    stop.stop_requested = True
    assert stop.check(3, exact=False) is None                # the signal arrived while step 3 ran
    late = stop.settle()
    assert (late.iteration, late.reason, late.diverged) == (3, "stop signal received", False)
    verdict = stop.check(4, exact=False)                     # a known reason makes the next check exact
    assert verdict is not None and (verdict.iteration, verdict.reason) == (4, "stop signal received")


def test_fp16_skips_and_lowers_the_scale_before_giving_up(tmp_path, capsys, monkeypatch):
    """fp16 overflows only count once the scale is at its minimum; until then each one halves the scale."""
    monkeypatch.setenv("GPT3D_FAULT_INJECT", "0:4:nan")
    log = tmp_path / "m.jsonl"
    rc = runs.train("--train-iters", "60", "--fp16", "--initial-loss-scale", "256", "--hysteresis", "1",
                "--max-skipped-steps", "3", "--log-file", str(log))
    assert rc == 3
    first, last = _stopped_iterations(capsys.readouterr().err)
    scales = {r["iteration"]: r["loss_scale"] for r in map(json.loads, log.read_text().splitlines())
              if "loss_scale" in r}
    assert [scales[i] for i in range(4, first)] == [256 / 2 ** k for k in range(1, first - 3)]
    assert scales[first - 1] == 1.0 and last - first + 1 == 3


def test_resume_restores_scheduler_and_loss_scaler(tmp_path):
    """fp16 with a scale that overflows, backs off and grows again: resumed state equals the unbroken one."""
    over = dict(fp16=True, initial_loss_scale=2.0 ** 18, hysteresis=1, loss_scale_window=2, train_iters=10)
    ref = make_trainer(tiny_config(**over))
    unbroken = run_curve(ref.cfg, trainer=ref)
    first = make_trainer(tiny_config(save=str(tmp_path / "ck"), **over))
    head = run_curve(first.cfg, iters=5, trainer=first)
    first.save()
    resumed = make_trainer(tiny_config(**over))
    resumed.load(str(tmp_path / "ck"))
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
    assert (resumed.state.iteration, resumed.state.consumed_samples) == \
        (first.state.iteration, first.state.consumed_samples)
    tail = run_curve(resumed.cfg, trainer=resumed)
    assert head["losses"] + tail["losses"] == pytest.approx(unbroken["losses"], abs=1e-5)
    assert resumed.scaler.state_dict() == ref.scaler.state_dict()
    assert ref.scaler.state_dict()["scale"] != 2.0 ** 18        # the scale did move


@pytest.mark.parametrize("where", ["shard", "latest"])
def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch, where):
    ck = tmp_path / "ck"
    import gpt3d.files.atomic
    import gpt3d.checkpoint.store as store
    real_save, real_text = store.save_file, gpt3d.files.atomic.write_text

    def save_file(tensors, path, metadata=None):
        if "iter_0000004" in path:   # half a shard reaches the disk, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(tensors, path, metadata=metadata)

    def write_text(path, text):
        if path.endswith("latest") and text == "iter_0000004":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path + ".tmp")
        return real_text(path, text)

    monkeypatch.setattr(store if where == "shard" else gpt3d.files.atomic, "save_file" if where == "shard" else
                        "write_text", save_file if where == "shard" else write_text)
    assert runs.train("--train-iters", "2", "--save", str(ck)) == 0
    before = runs.snapshot(ck)
    capsys.readouterr()
    rc = runs.train("--train-iters", "6", "--load", str(ck), "--save", str(ck), "--save-interval", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.match(r"gpt3d: error: could not write checkpoint .*iter_0000004: .*No space left on device.*; "
                    r"previous checkpoints are intact", err[0]), err
    after = runs.snapshot(ck)
    assert {k: v for k, v in after.items() if k in before} == before
    assert (ck / "latest").read_text() == "iter_0000002" and not [n for n in os.listdir(ck) if ".tmp" in n]
    assert checkpoint.resolve(str(ck)).endswith("iter_0000002")


@pytest.mark.slow
def test_exception_on_one_rank_ends_the_job_with_its_error(tmp_path):
    """torchrun, 2 gloo ranks; rank 1 raises at iteration 3: the job ends (well before the 10-minute collective
    timeout: the subprocess limit below is half of it), rank 1 named as root cause."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gpt3d",
                        "train", *runs.TINY, "--train-iters", "50", "--distributed-timeout-minutes", "10"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "GPT3D_FAULT_INJECT": "1:3"})
    out = r.stdout + r.stderr
    assert r.returncode != 0, r.returncode
    assert "RuntimeError: injected fault on rank 1 at iteration 3" in out
    assert "Root Cause" in out, out[-6000:]   # torchrun's failure summary (missing once in CI, session 46)
    root = out[out.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root) and "error_file: <N/A>" not in root
    assert "injected fault on rank 1 at iteration 3" in root, root
    shutil.rmtree(tmp_path, ignore_errors=True)


def _torchrun(launcher: list, train: list, fault: str) -> tuple[int, str]:
    """stdout + stderr of a 2-rank gloo job of the TINY model with GPT3D_FAULT_INJECT=`fault`, after asserting
    its exit status. No limit of its own: a job that never ended would be pytest-timeout's to fail."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *launcher,
                             "-m", "gpt3d", "train", *runs.TINY, "--distributed-timeout-minutes", "0.1", *train],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "GPT3D_FAULT_INJECT": fault})
    try:
        out, err = proc.communicate()
    finally:   # interrupted (pytest-timeout): no job, frozen worker included, outlives the test
        if proc.poll() is None:
            runs.kill_tree(proc.pid)
    return proc.returncode, out + err


@pytest.mark.slow
@pytest.mark.timeout(300)   # the bound: the 6 s timeout, torchrun's 30 s grace for a frozen worker, start-up
def test_a_frozen_rank_ends_the_job_naming_it(tmp_path):
    """Rank 1 of 2 is frozen (SIGSTOP) at iteration 5, as a hung node would be. Its peer used to wait forever in
    the gradient reduction (the DP group had torch's 30-minute default, not the job's timeout); now its
    watchdog (or the collective's own deadline, whichever comes first) ends it with one line naming rank 1 as
    silent, torchrun kills the frozen rank, and the job exits non-zero by itself, its checkpoints intact."""
    ck = tmp_path / "ck"
    rc, out = _torchrun([], ["--train-iters", "1000", "--save", str(ck), "--save-interval", "2"], "1:5:stop")
    assert rc != 0, out
    named = re.findall(r"gpt3d: (?:error|warning): rank 0: .*rank 1 sent no heartbeat for \d+ s \(stopped, dead or "
                       r"unreachable", out)
    assert named, out
    assert checkpoint.read_meta(checkpoint.resolve(str(ck)))["iteration"] == 4   # what a restart resumes from


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_rank_dumps_its_stack_and_the_restarted_job_resumes(tmp_path):
    """Rank 1's main thread hangs at iteration 5 (alive, in no collective: as in a stuck file system). The
    watchdogs end both ranks with status 4: one line says where rank 1's main thread is stuck, and rank 1's
    dump of its threads' stacks shows the call. torchrun --max-restarts 1 restarts the job, which resumes from
    the last checkpoint (iteration 4) and finishes (the fault hook stays out of a restarted job)."""
    ck = tmp_path / "ck"
    rc, out = _torchrun(["--max-restarts", "1"], ["--train-iters", "6", "--save", str(ck), "--load", str(ck),
                                                  "--save-interval", "2"], "1:5:hang")
    assert rc == 0, out
    errors = re.findall(r"^gpt3d: error: rank [01]: .*", out, flags=re.M)
    assert errors and all("exiting with status 4" in e for e in errors), out
    # whichever rank's watchdog fired first, a line says where rank 1 is stuck, and its stack shows the call
    assert any(re.search(r"(rank 1: no progress .* now in|rank 1 in) faulty_step \(train/faults\.py:\d+\)", e)
               for e in errors), errors
    assert re.search(r'faults\.py", line \d+ in faulty_step', out), out
    assert f"loaded checkpoint {ck / 'iter_0000004'} (iteration 4" in out
    assert checkpoint.read_meta(checkpoint.resolve(str(ck)))["iteration"] == 6


def test_docs_list_every_fault_test():
    """The "Faults tried" section of docs/faults.md is the list, read from that page itself so it cannot drift:
    every test of the files its introduction names (the fault suites) has a row, every test file the section
    names exists (found by name anywhere under tests/), and every test a row names exists in one of them."""
    doc = (ROOT / "docs" / "faults.md").read_text()
    start = doc.index("# Faults tried")
    end = doc.find("\n## ", start)
    section = doc[start:end if end >= 0 else len(doc)]
    intro, table = section[:section.index("\n|")], section[section.index("\n|"):]
    defs = {p.stem: re.findall(r"^def (test_\w+)", p.read_text(), flags=re.M)
            for p in (ROOT / "tests").rglob("test_*.py")}
    files = set(re.findall(r"\b(test_\w+)\.py", section))
    suites = set(re.findall(r"\b(test_\w+)\.py", intro))
    assert {"test_faults", "test_config_values"} <= suites and sorted(files - set(defs)) == []
    listed = set(re.findall(r"\b(test_\w+)\b(?!\.py)", table)) - files
    unlisted = [f"{f}.py::{n}" for f in sorted(suites) for n in defs[f]
                if n not in listed and n != "test_docs_list_every_fault_test"]
    assert unlisted == [], "tests of the fault suites without a row in docs/faults.md's Faults tried table"
    stale = sorted(listed - {n for f in files for n in defs[f]})
    assert stale == [], "tests named in docs/faults.md's Faults tried table that do not exist"


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_every_stage(tmp_path):
    """Preemption of a 2-stage pipeline job: torchrun forwards SIGTERM to its workers, which agree to stop,
    finish the step in flight and write one complete checkpoint of both stages before the agent gives up."""
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gpt3d",
                             "train", *runs.TINY, "--pipeline-model-parallel-size", "2", "--train-iters", "100000",
                             "--save", str(ck), "--log-file", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    runs.wait_for(lambda: runs.last_iteration(log) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    last = runs.last_iteration(log)
    assert f"stop signal received at iteration {last}: saving and exiting" in out + err
    path = checkpoint.resolve(str(ck))
    assert path.endswith(f"iter_{last:07d}") and checkpoint.read_meta(path)["iteration"] == last
    assert sorted(p.name for p in Path(path).glob("model_*.safetensors")) == \
        ["model_tp0_pp0.safetensors", "model_tp0_pp1.safetensors"]
