"""A resume that would change the data stream is refused with one line saying what changed, unless
--override-data-state; then the counters stay consistent (rows: a resume with another --seq-length was
accepted silently and the logged token count went backwards 51,200 -> 26,112; another --data-path or
--global-batch-size was accepted without a word)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support import runs

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def _rows(log: Path) -> list:
    return [json.loads(x) for x in log.read_text().splitlines()]


def _refused(capsys, tmp_path, *args) -> str:
    before, run_dirs = runs.snapshot(tmp_path / "ck"), runs.run_dirs()
    capsys.readouterr()
    rc = runs.train(*args)
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "would change the data stream: " in err[0], err
    assert "Pass --override-data-state" in err[0]
    assert "loaded checkpoint" not in out.out   # the checks come first: a refused resume never says "loaded"
    after = runs.snapshot(tmp_path / "ck")
    assert after == before   # no checkpoint written or removed
    assert runs.run_dirs() == run_dirs   # and no run directory made
    return err[0]


def test_other_seq_length_is_refused_and_override_keeps_tokens_growing(tmp_path, capsys):
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    common = ["--max-position-embeddings", "16", "--save", str(ck), "--log-file", str(log)]
    assert runs.train("--train-iters", "4", *common) == 0
    saved_tokens = _rows(log)[-1]["tokens"]
    assert saved_tokens == 4 * 4 * 16
    err = _refused(capsys, tmp_path, "--train-iters", "8", "--seq-length", "8", "--load", str(ck), *common)
    assert "--seq-length 16 -> 8" in err and "sample position 16 and 256 tokens carry over" in err
    assert runs.train("--train-iters", "8", "--seq-length", "8", "--load", str(ck), "--override-data-state",
                      *common) == 0
    assert "--override-data-state: the data stream changed (--seq-length 16 -> 8)" in capsys.readouterr().err
    rows = _rows(log)
    resumed = rows[[i for i, r in enumerate(rows) if "run_start" in r][-1]:]
    assert resumed[0]["tokens"] == saved_tokens
    tokens = [r["tokens"] for r in resumed if "loss" in r]
    assert tokens == [saved_tokens + k * 4 * 8 for k in range(1, 5)]   # 4 more steps of 4 x 8 tokens
    meta = json.loads((ck / "iter_0000008" / "meta.json").read_text())
    assert (meta["tokens"], meta["consumed_samples"], meta["data_state"]["seq_length"]) == (384, 32, 8)


def test_a_refused_resume_creates_no_log_file(tmp_path, capsys):
    """Row: a resume refused for its data stream left a new, empty --log-file behind; the metrics file and
    TensorBoard directory are created only once the run is accepted."""
    ck = tmp_path / "ck"
    assert runs.train("--train-iters", "2", "--max-position-embeddings", "16", "--save", str(ck)) == 0
    _refused(capsys, tmp_path, "--train-iters", "4", "--seq-length", "8", "--max-position-embeddings", "16",
             "--load", str(ck), "--save", str(ck), "--log-file", str(tmp_path / "runs" / "new.jsonl"),
             "--tensorboard-dir", str(tmp_path / "tb"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_other_global_batch_is_refused(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert runs.train("--train-iters", "2", "--save", str(ck)) == 0
    err = _refused(capsys, tmp_path, "--train-iters", "4", "--global-batch-size", "8", "--load", str(ck),
                   "--save", str(ck))
    assert "--global-batch-size 4 -> 8" in err
    assert runs.train("--train-iters", "4", "--load", str(ck), "--save", str(ck)) == 0   # same settings: fine


def _data_args(prefix, bpe, *extra) -> list:
    return ["--no-mock-data", "--data-path", str(prefix), "--vocab-file", str(bpe.vocab), "--merge-file",
            str(bpe.merges), "--vocab-size", "4096", "--split", "1,0,0", *extra]


def test_other_data_path_tokenizer_or_sample_order_is_refused(tmp_path, capsys, text_prefix, bpe):
    ck = tmp_path / "ck"
    assert runs.train(*_data_args(text_prefix, bpe), "--train-iters", "2", "--save", str(ck)) == 0
    copy = tmp_path / "copy" / "text"
    copy.parent.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(text_prefix + ext, str(copy) + ext)
    resume = ["--load", str(ck), "--save", str(ck)]
    err = _refused(capsys, tmp_path, *_data_args(copy, bpe), "--train-iters", "4", *resume)
    assert f"--data-path {text_prefix} -> {copy}" in err
    (tmp_path / "tok").mkdir()
    merges = tmp_path / "tok" / "merges.txt"
    merges.write_text("".join(Path(bpe.merges).read_text().splitlines(keepends=True)[:-1]))
    other = type(bpe)(bpe.vocab, merges)
    capsys.readouterr()   # another tokenizer: refused by the checkpoint's tokenizer check, not overridable
    assert runs.train(*_data_args(text_prefix, other), "--train-iters", "4", *resume, "--override-data-state") == 2
    assert "was trained with another tokenizer" in capsys.readouterr().err
    # more iterations are fine while the index keeps its epochs; enough to need a second epoch reshuffle it
    epoch = Path(text_prefix + ".bin").stat().st_size // 2 // 16 // 4   # iterations in one epoch, roughly
    err = _refused(capsys, tmp_path, *_data_args(text_prefix, bpe), "--train-iters", str(2 * epoch), *resume)
    assert "the sample order" in err and "1 epoch -> 2 epochs" in err
    assert runs.train(*_data_args(text_prefix, bpe), "--train-iters", "4", *resume) == 0


@pytest.mark.parametrize("unset,explicit", [
    ([], ["--num-key-value-heads", "4"]),                     # kv heads default to the attention heads (4)
    ([], ["--ffn-hidden-size", "128"]),                       # the FFN defaults to 4 x hidden (32)
    (["--swiglu"], ["--swiglu", "--ffn-hidden-size", "64"]),  # SwiGLU's default: 8/3 x hidden, rounded to 64
])
def test_a_resume_compares_the_resolved_model_shape(tmp_path, capsys, unset, explicit):
    """Row: resuming with --num-key-value-heads equal to the heads, or --ffn-hidden-size equal to its default, was
    refused as "an incompatible model shape" though it is the same model; either way round it resumes now, and
    a shape that does differ is still refused, naming the resolved values."""
    for saved, resumed in ((unset, explicit), (explicit, unset)):
        ck = tmp_path / f"ck{len(saved)}"
        assert runs.train("--train-iters", "2", "--save", str(ck), *saved) == 0
        capsys.readouterr()
        assert runs.train("--train-iters", "3", "--load", str(ck), *resumed) == 0
        assert f"loaded checkpoint {ck / 'iter_0000002'}" in capsys.readouterr().out
    before = runs.snapshot(ck)
    assert runs.train("--train-iters", "3", "--load", str(ck), *unset, "--num-key-value-heads", "2") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "gpt3d: error: checkpoint model has num_key_value_heads=4 but this run has 2: incompatible model shape"]
    assert runs.snapshot(ck) == before
