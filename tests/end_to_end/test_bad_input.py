"""Bad input to `gpt3d train` and `preprocess`: one error line, nothing existing touched.

Missing or corrupt tokenizer files, data files that disagree with their index, data too small for the
sequence, a typo in a config file, a world size the layout does not divide, a checkpoint of another shape,
and a malformed JSONL line: each run ends with exit 2 and one `gpt3d: error:` line, and every file that was
there before is byte for byte the same. docs/faults.md's "Faults tried" table lists them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from gpt3d.commands.preprocess import main as preprocess_main

from tests.support import runs

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")   # @record under capsys


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
    assert runs.train("--train-iters", "1", "--save", str(tmp_path / "ck")) == 0
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
    before = runs.snapshot(tmp_path)
    capsys.readouterr()
    rc = runs.train(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gpt3d: error: "), err
    assert re.search(message, err[0]), err[0]
    after = runs.snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before


def test_preprocess_malformed_line_and_empty_documents(tmp_path, capsys, bpe):
    """Empty documents are kept as empty documents (Megatron) and counted; a malformed line names file:line
    and keeps old outputs."""
    prefix = _corpus(tmp_path, bpe, ["first", "", "second", "", ""])
    assert "processed 5 documents (3 empty)" in capsys.readouterr().out
    before = runs.snapshot(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": "ok"\n')
    rc = preprocess_main(["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "c"),
                          "--vocab-file", str(bpe.vocab), "--merge-file", str(bpe.merges)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{tmp_path / 'bad.jsonl'}:3: malformed JSON" in err[0], err
    after = runs.snapshot(tmp_path)
    assert after.pop("bad.jsonl") and after == before
    assert os.path.exists(prefix + ".bin")
