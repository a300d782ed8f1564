"""What a new user sees in the first hour (issue 26): slow commands report progress off a terminal without
breaking --json, generate says when a request exceeds the context, and every run gets a directory of its own."""
from __future__ import annotations

import json
import os

import pytest

from gpt3d.cli import main as cli_main

from tests.support import runs

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def _progress_lines(err: str, what: str) -> list:
    return [x for x in err.splitlines() if x.startswith("[") and f"] {what}" in x]


def test_slow_commands_report_progress_off_a_terminal_and_keep_stdout_clean(tmp_path, capsys, monkeypatch,
                                                                              text_prefix):
    """GPT3D_PROGRESS_INTERVAL=0 prints a progress line at every update (no test waits 10 s): eval, generate and
    checkpoint verify write dated lines with rate and ETA to stderr, and stdout holds only their results."""
    ck = tmp_path / "ck"
    assert runs.train("--train-iters", "1", "--vocab-size", "4096", "--save", str(ck),
                      "--log-file", str(tmp_path / "m.jsonl")) == 0
    monkeypatch.setenv("GPT3D_PROGRESS_INTERVAL", "0")
    capsys.readouterr()
    assert cli_main(["eval", "--load", str(ck), "--data-path", text_prefix, "--split", "1,0,0", "--eval-split",
                     "train", "--max-tokens", "2000", "--micro-batch-size", "4", "--seq-length", "16"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)                 # stdout: the one JSON line, nothing else
    assert result["tokens"] > 0 and out.out.count("\n") == 1
    lines = _progress_lines(out.err, "eval: ")
    assert len(lines) >= 3 and all("tokens/s" in x and "ETA" in x for x in lines[:-1]), out.err
    assert "eval: done, 2,000 tokens" in lines[-1]

    assert cli_main(["generate", "--load", str(ck), "--tokenizer-type", "NullTokenizer", "--prompt", "1 2 3",
                     "--max-new-tokens", "5", "--no-stop-at-eod", "--json"]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)["tokens"]) == 5 and len(_progress_lines(out.err, "generate: ")) == 6

    assert cli_main(["checkpoint", "verify", str(ck)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ok   ") and out.out.count("\n") == 1
    assert _progress_lines(out.err, f"verifying {ck / 'iter_0000001'}: ") and " MB/s" in out.err
    assert cli_main(["checkpoint-info", str(ck)]) == 0      # ZeRO as configured, and what it means at DP 1
    assert "layout: TP=1 PP=1 DP=1 ZeRO-1 (no sharding at DP 1)" in capsys.readouterr().out


def test_generate_says_when_the_request_exceeds_the_context(tmp_path, capsys):
    """Learned positions (16 here): asking for 40 new tokens after 3 gives 13, with a warning saying so and
    `stopped_by` naming the context; within the context, no warning."""
    ck = tmp_path / "ck"
    assert runs.train("--train-iters", "1", "--save", str(ck), "--log-file", str(tmp_path / "m.jsonl")) == 0
    gen = ["generate", "--load", str(ck), "--tokenizer-type", "NullTokenizer", "--prompt", "1 2 3", "--json",
           "--no-stop-at-eod", "--temperature", "0"]
    capsys.readouterr()
    assert cli_main([*gen, "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert len(result["tokens"]) == 13 and result["stopped_by"] == "context"
    warning = [x for x in out.err.splitlines() if x.startswith("gpt3d: warning:")]
    assert warning == ["gpt3d: warning: the prompt (3 tokens) and --max-new-tokens 40 exceed the model's 16 "
                       "positions: at most 13 new tokens will be generated"], out.err
    assert cli_main([*gen, "--max-new-tokens", "13"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["stopped_by"] == "max_new_tokens" and "warning" not in out.err


def test_every_run_gets_its_own_directory_and_a_resume_keeps_it(tmp_path, capsys, monkeypatch):
    """Runs are named by --run-name (or their --config file); a second run of a name gets name-2, a resume
    of a run writes on in that run's directory, a --finetune from it is a new run, --run-dir is taken as given,
    and a run whose outputs all have their own flags makes no directory."""
    monkeypatch.setenv("GPT3D_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "ck"

    def run(*args: str) -> str:
        capsys.readouterr()
        assert runs.train(*args) == 0
        out = capsys.readouterr().out
        return next(x for x in out.splitlines() if x.startswith("run directory: ")).split(" | ")[0][15:]

    first = run("--run-name", "exp", "--train-iters", "2", "--save", str(ck))
    second = run("--run-name", "exp", "--train-iters", "2")
    assert (first, second) == (str(tmp_path / "runs" / "exp"), str(tmp_path / "runs" / "exp-2"))
    resumed = run("--run-name", "exp", "--train-iters", "4", "--load", str(ck), "--save", str(ck))
    assert resumed == first
    rows = [json.loads(x) for x in (tmp_path / "runs" / "exp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2, 3, 4]   # one curve, in one directory
    assert (tmp_path / "runs" / "exp" / "metrics.png").is_file()
    assert run("--run-name", "exp", "--train-iters", "1", "--load", str(ck), "--finetune") == \
        str(tmp_path / "runs" / "exp-3")
    assert run("--train-iters", "1") == str(tmp_path / "runs" / "train")       # no name, no config
    assert run("--run-dir", "mine", "--train-iters", "1") == "mine" and os.path.isfile("mine/metrics.jsonl")
    before = sorted(os.listdir(tmp_path / "runs"))
    assert run("--train-iters", "1", "--log-file", "own.jsonl").startswith("none")
    assert sorted(os.listdir(tmp_path / "runs")) == before
    assert sorted(os.listdir(tmp_path / "runs")) == ["exp", "exp-2", "exp-3", "train"]


def test_a_config_names_its_run(tmp_path, capsys, monkeypatch):
    from tests.support import ROOT
    monkeypatch.setenv("GPT3D_RUNS_DIR", str(tmp_path / "runs"))
    capsys.readouterr()
    assert cli_main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--num-layers", "1",
                     "--hidden-size", "16", "--num-attention-heads", "2", "--vocab-size", "128", "--seq-length",
                     "8", "--max-position-embeddings", "8", "--micro-batch-size", "2", "--global-batch-size", "2",
                     "--train-iters", "1", "--eval-iters", "0", "--device", "cpu"]) == 0
    assert f"run directory: {tmp_path / 'runs' / 'tiny'} |" in capsys.readouterr().out
    assert (tmp_path / "runs" / "tiny" / "metrics.jsonl").is_file()
