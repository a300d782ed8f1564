"""Faults a long pretraining run meets, each injected for real; README's "Faults tried" table lists them.

Real kills and signals go to a `python -m gpt3d train` subprocess; everything
else runs `gpt3d.cli.main` in this process (same code path, no torch import).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from curves import make_trainer, run_curve, tiny_config

from gpt3d import checkpoint
from gpt3d.cli import main as cli_main
from gpt3d.data.preprocess import main as preprocess_main

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")   # @record under capsys
ROOT = Path(__file__).resolve().parents[1]
# Tiny model, dropout on (so RNG restore matters), LR schedule independent of --train-iters.
TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--vocab-size", "256", "--make-vocab-size-divisible-by", "8",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2", "--min-lr", "1e-3",
        "--lr-warmup-iters", "3", "--lr-decay-iters", "40", "--seed", "7", "--device", "cpu",
        "--log-interval", "1", "--eval-iters", "1"]


def _train(*args: str) -> int:
    return cli_main(["train", *TINY, *args])


def _losses(log: Path) -> dict:
    """iteration -> loss; a re-run iteration keeps its latest value."""
    return {r["iteration"]: r["loss"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r}


def _checkpoints(ck: Path) -> list:
    """The save directory's entries but the run's lock file (it stays, released, after the run)."""
    return sorted(n for n in os.listdir(ck) if n != ".lock")


def _snapshot(root: Path) -> dict:
    """Every file's digest, but a save directory's .lock (each run that owns the directory rewrites it)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpt3d", "train", *TINY, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _wait_for(cond, proc: subprocess.Popen) -> None:
    """Poll until `cond()` holds. No clock: the run ending first fails the test, a hung run is pytest-timeout's
    (and the run is killed on the way out, so nothing is left behind)."""
    try:
        while not cond():
            assert proc.poll() is None, f"run ended before the fault: {proc.communicate()[1][-2000:]}"
            time.sleep(0.002)
    except BaseException:
        proc.kill()
        raise


def _last_iteration(log: Path) -> int:
    try:
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.endswith("}")]
    except FileNotFoundError:
        return 0
    return max((r["iteration"] for r in rows if "loss" in r), default=0)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> dict:
    log = tmp_path_factory.mktemp("unbroken") / "m.jsonl"
    assert _train("--train-iters", "30", "--log-file", str(log)) == 0
    return _losses(log)


def _kill_then_resume(tmp_path: Path, unbroken: dict, save_interval: int, kill_when) -> tuple[Path, str]:
    """SIGKILL a 400-iteration run when `kill_when(ck, log)` holds, resume to 30 iterations, compare."""
    ck, log = tmp_path / "ck", tmp_path / "killed.jsonl"
    proc = _spawn("--train-iters", "400", "--save", str(ck), "--save-interval", str(save_interval),
                  "--log-file", str(log))
    _wait_for(lambda: kill_when(ck, log), proc)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    state = " ".join(sorted(os.listdir(ck)))
    loaded = checkpoint.resolve(str(ck))
    start = checkpoint.read_meta(loaded)["iteration"]
    assert 0 < start < 30, state
    killed = _losses(log)
    for it, loss in killed.items():
        if it <= 30:
            assert abs(loss - unbroken[it]) <= 1e-5, f"killed run, iteration {it}"
    resumed_log = tmp_path / "resumed.jsonl"
    assert _train("--train-iters", "30", "--load", str(ck), "--save", str(ck), "--save-interval",
                  str(save_interval), "--log-file", str(resumed_log)) == 0
    resumed = _losses(resumed_log)
    assert sorted(resumed) == list(range(start + 1, 31))
    for it, loss in resumed.items():
        assert abs(loss - unbroken[it]) <= 1e-5, f"resumed from {start}: iteration {it} {loss} vs {unbroken[it]}"
    return ck, state


@pytest.mark.slow
def test_kill9_mid_run_resumes_the_unbroken_curve(tmp_path, unbroken):
    _kill_then_resume(tmp_path, unbroken, 5, lambda ck, log: _last_iteration(log) >= 12)


@pytest.mark.slow
def test_kill9_while_saving_resumes_the_unbroken_curve(tmp_path, unbroken):
    """Killed the moment a checkpoint's .tmp directory appears (a save in progress)."""
    def saving(ck: Path, log: Path) -> bool:
        return ck.is_dir() and any(re.fullmatch(r"iter_\d+\.tmp", n) and n >= "iter_0000004"
                                      for n in os.listdir(ck))
    ck, state = _kill_then_resume(tmp_path, unbroken, 1, saving)
    assert not [n for n in os.listdir(ck) if n.startswith("iter_") and n.endswith(".tmp")], \
        "the next save removes leftovers of the killed one"


def test_truncated_checkpoint_is_skipped_with_a_warning(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert _train("--train-iters", "4", "--save", str(ck), "--save-interval", "2") == 0
    victim = next((ck / "iter_0000004").glob("model_*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-7])
    capsys.readouterr()
    assert _train("--train-iters", "5", "--load", str(ck)) == 0
    out = capsys.readouterr()
    assert re.search(r"warning: skipping checkpoint .*iter_0000004: .*truncated", out.err), out.err
    assert "loaded checkpoint" in out.out and "iteration 2" in out.out


def test_keep_last_retention(tmp_path):
    ck = tmp_path / "ck"
    (ck / "iter_0000001.tmp").mkdir(parents=True)      # leftover of a save killed mid-write
    (ck / "iter_0000099").mkdir()                      # another timeline's newer checkpoint: not ours to delete
    assert _train("--train-iters", "5", "--save", str(ck), "--save-interval", "1", "--keep-last", "2") == 0
    assert _checkpoints(ck) == ["iter_0000004", "iter_0000005", "iter_0000099", "latest"]
    assert (ck / "latest").read_text() == "iter_0000005"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits_0(tmp_path, sig):
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    proc = _spawn("--train-iters", "100000", "--save", str(ck), "--log-file", str(log))
    _wait_for(lambda: _last_iteration(log) >= 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    last = _last_iteration(log)
    assert (ck / "latest").read_text() == f"iter_{last:07d}"       # the step in flight finished and was saved
    assert checkpoint.read_meta(checkpoint.resolve(str(ck)))["iteration"] == last
    assert f"stop signal received at iteration {last}: saving and exiting" in out


def test_exit_duration_saves_and_exits_0(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert _train("--train-iters", "100000", "--save", str(ck), "--exit-duration-in-mins", "0.002") == 0
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
    rc = _train("--train-iters", "20", "--save", str(ck), "--save-interval", "2", *flags)
    err = capsys.readouterr().err
    assert rc == 3
    assert _stopped_iterations(err) == (first, last)
    assert f"last good checkpoint: {ck / 'iter_0000002'}" in err
    assert _checkpoints(ck) == ["iter_0000002", "latest"] and (ck / "latest").read_text() == "iter_0000002"


@pytest.mark.parametrize("flags,first,last", [(["--max-skipped-steps", "3"], 5, 7),
                                               (["--check-for-nan-in-loss-and-grad"], 5, 5)])
def test_stop_read_between_log_lines_names_the_same_iterations(tmp_path, capsys, monkeypatch, flags, first, last):
    """Between log lines the stop check is read one step late (no host sync per step): a run that diverges
    there still names the iterations where it diverged, saves nothing after them and writes no later row."""
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    monkeypatch.setenv("GPT3D_FAULT_INJECT", "0:5:nan")
    rc = _train("--train-iters", "20", "--log-interval", "10", "--save", str(ck), "--save-interval", "2",
                "--log-file", str(log), *flags)
    err = capsys.readouterr().err
    assert rc == 3
    assert _stopped_iterations(err) == (first, last)        # 7 and 5 are read late: no log line, no save there
    assert f"last good checkpoint: {ck / 'iter_0000004'}" in err
    assert _checkpoints(ck) == ["iter_0000002", "iter_0000004", "latest"]   # 6 was bad: not saved
    assert not log.exists() or _last_iteration(log) == 0


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
    rc = _train("--train-iters", "60", "--fp16", "--initial-loss-scale", "256", "--hysteresis", "1",
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
    import gpt3d.atomic
    import gpt3d.checkpoint.store as store
    real_save, real_text = store.save_file, gpt3d.atomic.write_text

    def save_file(tensors, path, metadata=None):
        if "iter_0000004" in path:   # half a shard reaches the disk, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(tensors, path, metadata=metadata)

    def write_text(path, text):
        if path.endswith("latest") and text == "iter_0000004":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path + ".tmp")
        return real_text(path, text)

    monkeypatch.setattr(store if where == "shard" else gpt3d.atomic, "save_file" if where == "shard" else
                        "write_text", save_file if where == "shard" else write_text)
    assert _train("--train-iters", "2", "--save", str(ck)) == 0
    before = _snapshot(ck)
    capsys.readouterr()
    rc = _train("--train-iters", "6", "--load", str(ck), "--save", str(ck), "--save-interval", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.match(r"gpt3d: error: could not write checkpoint .*iter_0000004: .*No space left on device.*; "
                    r"previous checkpoints are intact", err[0]), err
    after = _snapshot(ck)
    assert {k: v for k, v in after.items() if k in before} == before
    assert (ck / "latest").read_text() == "iter_0000002" and not (ck / "iter_0000004.tmp").exists()
    assert checkpoint.resolve(str(ck)).endswith("iter_0000002")


# ----- bad input: one error line, nothing existing touched ---------------------------------------------------
def _corpus(tmp_path: Path, bpe, texts: list) -> str:
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert preprocess_main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "c"),
                            "--vocab-file", str(bpe.vocab), "--merge-file", str(bpe.merges)]) == 0
    return str(tmp_path / "c_text_document")


def _data_args(prefix: str, bpe, vocab=None, merges=None) -> list:
    return ["--no-mock-data", "--vocab-size", "50257", "--data-path", prefix,
            "--vocab-file", str(vocab or bpe.vocab), "--merge-file", str(merges or bpe.merges),
            "--split", "1,0,0", "--train-iters", "2"]


def _bad_vocab(tmp_path, bpe):
    (tmp_path / "v.json").write_text('{"hello": 0, ')
    return _data_args(_corpus(tmp_path, bpe, ["some words"] * 40), bpe, vocab=tmp_path / "v.json")


def _bad_merges(tmp_path, bpe):
    (tmp_path / "m.txt").write_bytes(b"#version: 0.2\n\xff\xfe\x00garbage\n")
    return _data_args(_corpus(tmp_path, bpe, ["some words"] * 40), bpe, merges=tmp_path / "m.txt")


def _no_bin(tmp_path, bpe):
    prefix = _corpus(tmp_path, bpe, ["some words"] * 40)
    os.remove(prefix + ".bin")
    return _data_args(prefix, bpe)


def _short_bin(tmp_path, bpe):
    prefix = _corpus(tmp_path, bpe, ["some words"] * 40)
    with open(prefix + ".bin", "r+b") as fh:
        fh.truncate(os.path.getsize(prefix + ".bin") - 2)
    return _data_args(prefix, bpe)


def _bad_shape_checkpoint(tmp_path, bpe):
    assert _train("--train-iters", "1", "--save", str(tmp_path / "ck")) == 0
    return ["--hidden-size", "64", "--load", str(tmp_path / "ck"), "--save", str(tmp_path / "ck"),
            "--train-iters", "2"]


def _typo(tmp_path, bpe):
    (tmp_path / "c.yaml").write_text("model:\n  num_layer: 2\n")
    return ["--config", str(tmp_path / "c.yaml"), "--train-iters", "1"]


@pytest.mark.parametrize("case,setup,message", [
    ("missing vocab", lambda p, b: _data_args(_corpus(p, b, ["a b"] * 40), b, vocab=p / "nope.json"),
     r"vocab file not found: .*nope.json"),
    ("corrupt vocab", _bad_vocab, r"v.json: corrupt vocab file"),
    ("corrupt merges", _bad_merges, r"m.txt: corrupt merges file \(not UTF-8"),
    ("idx without bin", _no_bin, r"c_text_document.bin: data file not found \(its index .* exists\)"),
    ("bin size mismatch", _short_bin, r"c_text_document.bin: size \d+ bytes does not match its index"),
    ("data too small",
     lambda p, b: _data_args(_corpus(p, b, ["a few words", "", "more"]), b) + ["--seq-length", "64"],
     r"the train split has 2 documents and \d+ tokens: data too small for seq length 64"),
    ("config typo", _typo, r"unknown setting 'num_layer' in .*c.yaml \(did you mean 'num_layers'\?\)"),
    ("world size", lambda p, b: ["--tp", "2", "--train-iters", "1"],
     r"world size 3 is not divisible by TP x PP = 2 x 1"),
    ("incompatible checkpoint", _bad_shape_checkpoint,
     r"checkpoint model has hidden_size=32 but this run has 64: incompatible model shape"),
])
def test_bad_input_one_error_line_nothing_touched(tmp_path, capsys, monkeypatch, bpe, case, setup, message):
    if case == "world size":
        monkeypatch.setenv("WORLD_SIZE", "3")   # validated before joining the (absent) other ranks
    args = setup(tmp_path, bpe)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    rc = _train(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gpt3d: error: "), err
    assert re.search(message, err[0]), err[0]
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before


def test_preprocess_malformed_line_and_empty_documents(tmp_path, capsys, bpe):
    """Empty documents are kept as empty documents (Megatron) and counted; a malformed line names file:line
    and keeps old outputs."""
    prefix = _corpus(tmp_path, bpe, ["first", "", "second", "", ""])
    assert "processed 5 documents (3 empty)" in capsys.readouterr().out
    before = _snapshot(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": "ok"\n')
    rc = preprocess_main(["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "c"),
                          "--vocab-file", str(bpe.vocab), "--merge-file", str(bpe.merges)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{tmp_path / 'bad.jsonl'}:3: malformed JSON" in err[0], err
    after = _snapshot(tmp_path)
    assert after.pop("bad.jsonl") and after == before
    assert os.path.exists(prefix + ".bin")


@pytest.mark.slow
def test_exception_on_one_rank_ends_the_job_with_its_error(tmp_path):
    """torchrun, 2 gloo ranks; rank 1 raises at iteration 3: the job ends (well before the 10-minute collective
    timeout: the subprocess limit below is half of it), rank 1 named as root cause."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gpt3d",
                        "train", *TINY, "--train-iters", "50", "--distributed-timeout-minutes", "10"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "GPT3D_FAULT_INJECT": "1:3"})
    out = r.stdout + r.stderr
    assert r.returncode != 0, r.returncode
    assert "RuntimeError: injected fault on rank 1 at iteration 3" in out
    root = out[out.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root) and "error_file: <N/A>" not in root
    assert "injected fault on rank 1 at iteration 3" in root, root
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_readme_lists_every_fault_test():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Faults tried"):]
    names = [n for f in ("test_faults.py", "test_integrity.py", "test_ownership.py", "test_resume_checks.py")
             for n in re.findall(r"^def (test_\w+)", (Path(__file__).parent / f).read_text(), flags=re.M)]
    assert [n for n in names if n != "test_readme_lists_every_fault_test" and n not in table] == []


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_every_stage(tmp_path):
    """Preemption of a 2-stage pipeline job: torchrun forwards SIGTERM to its workers, which agree to stop,
    finish the step in flight and write one complete checkpoint of both stages before the agent gives up."""
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gpt3d",
                             "train", *TINY, "--pipeline-model-parallel-size", "2", "--train-iters", "100000",
                             "--save", str(ck), "--log-file", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for(lambda: _last_iteration(log) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    last = _last_iteration(log)
    assert f"stop signal received at iteration {last}: saving and exiting" in out + err
    path = checkpoint.resolve(str(ck))
    assert path.endswith(f"iter_{last:07d}") and checkpoint.read_meta(path)["iteration"] == last
    assert sorted(p.name for p in Path(path).glob("model_*.safetensors")) == \
        ["model_tp0_pp0.safetensors", "model_tp0_pp1.safetensors"]
