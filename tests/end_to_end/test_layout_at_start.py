"""A layout the runtime cannot run is refused at start, in one line, before any process group or model exists.

The case of issue 27: 2 ranks, PP 2, one layer per virtual pipeline stage (2 chunks per stage) and a global batch
of 3 micro-batches. It used to pass validation and die at the first step with `ValueError: interleaved pipeline
needs micro-batches (3) divisible by PP (2)` and a traceback on every rank.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest

from gpt3d import cli
from tests.support import ROOT, runs

ISSUE = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--pipeline-model-parallel-size", "2",
         "--num-layers-per-virtual-pipeline-stage", "1", "--micro-batch-size", "2", "--global-batch-size", "6"]
WHY = ("needs the micro-batches per step (3 = global batch / (micro batch x DP)) to be a multiple of "
       "--pipeline-model-parallel-size (2)")


@pytest.mark.timeout(300)
def test_an_interleaved_layout_the_schedule_cannot_run_is_one_line_at_start(tmp_path, monkeypatch):
    # one rank of the job as torchrun starts it (no peer ever comes: the refusal must not wait for one)
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["train", *ISSUE, "--device", "cpu", "--distributed-timeout-minutes", "0.1",
                       "--save", str(tmp_path / "ck")])
    lines = err.getvalue().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("gpt3d: error: ") and WHY in lines[0], lines
    assert not (tmp_path / "ck").exists()

    # the real job: each worker prints that line and exits 2, no traceback of gpt3d's
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gpt3d",
                             "train", *ISSUE, "--device", "cpu", "--distributed-timeout-minutes", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err_text = proc.communicate()
    finally:
        if proc.poll() is None:
            runs.kill_tree(proc.pid)
    text = out + err_text
    ours = [line for line in text.splitlines() if line.startswith("gpt3d: error: ")]
    assert proc.returncode != 0 and ours and all(line == lines[0] for line in ours), text[-3000:]
    frames = [line for line in text.splitlines() if line.strip().startswith('File "') and "/gpt3d/" in line]
    assert "exitcode: 2" in text and "ValueError" not in text and not frames, text[-3000:]
