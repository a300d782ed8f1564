"""Real `gpt3d train` runs of a tiny model, as the fault tests make them.

`train` runs `gpt3d.cli.main` in this process (same code path, cheap); `spawn` starts `python -m gpt3d train`
as a process that a test can kill or signal, and `wait_for` polls it without a clock. The rest reads what a
run leaves behind: its metrics file, its save directory, every file's digest.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpt3d.cli import main as cli_main

from tests.support import ROOT

# Tiny model, dropout on (so RNG restore matters), LR schedule independent of --train-iters.
TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--vocab-size", "256", "--make-vocab-size-divisible-by", "8",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2", "--min-lr", "1e-3",
        "--lr-warmup-iters", "3", "--lr-decay-iters", "40", "--seed", "7", "--device", "cpu",
        "--log-interval", "1", "--eval-iters", "1"]


def train(*args: str) -> int:
    """`gpt3d train` of the TINY model with `args`, in this process; its exit code."""
    return cli_main(["train", *TINY, *args])


def losses(log: Path) -> dict:
    """iteration -> loss; a re-run iteration keeps its latest value."""
    return {r["iteration"]: r["loss"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r}


def checkpoints(ck: Path) -> list:
    """The save directory's entries but the run's lock file (it stays, released, after the run)."""
    return sorted(n for n in os.listdir(ck) if n != ".lock")


def snapshot(root: Path) -> dict:
    """Every file's digest, but a save directory's .lock (each run that owns the directory rewrites it)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m gpt3d train` of the TINY model as a process of its own (to be killed or signalled)."""
    return subprocess.Popen([sys.executable, "-m", "gpt3d", "train", *TINY, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for(cond, proc: subprocess.Popen) -> None:
    """Poll until `cond()` holds. No clock: the run ending first fails the test, a hung run is pytest-timeout's
    (and the run is killed on the way out, so nothing is left behind)."""
    try:
        while not cond():
            assert proc.poll() is None, f"run ended before the fault: {proc.communicate()[1][-2000:]}"
            time.sleep(0.002)
    except BaseException:
        proc.kill()
        raise


def run_dirs() -> list:
    """The run directories made so far under the tests' runs root ($GPT3D_RUNS_DIR, set by tests/conftest.py)."""
    root = Path(os.environ["GPT3D_RUNS_DIR"])
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (torchrun's workers live in sessions of their own), found
    through /proc: what a test interrupted by pytest-timeout leaves behind."""
    children: dict = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def last_iteration(log: Path) -> int:
    """The last iteration the metrics file logged a loss for; 0 before the first (or without the file)."""
    try:
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.endswith("}")]
    except FileNotFoundError:
        return 0
    return max((r["iteration"] for r in rows if "loss" in r), default=0)
