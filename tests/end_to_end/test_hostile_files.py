"""Every file gpt3d reads, damaged: one `gpt3d: error:` line, exit 2, nothing existing changed, or success
(issue 24). Never a traceback.

First the bad inputs the issue found ending in a traceback, each once; then hypothesis drives each kind of
file (ds_config JSON, an HF directory's config.json and safetensors header, a checkpoint's meta.json, the
.bin/.idx data, text in any encoding) with values of the wrong type, truncations and bit flips, through the
command that reads it, in this process (`gpt3d.cli.main`). docs/faults.md's "Faults tried" table has a row per test.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import hostile, runs
from tests.support.fuzz import fuzz
from tests.support.hostile import damage_json, one_error_line, reseal, run_cli, write_damaged

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

VOCAB = 300
NULL_TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1)]
DS_CONFIG = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
             "gradient_clipping": 1.0, "steps_per_print": 10, "wall_clock_breakdown": False,
             "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e8, "overlap_comm": True},
             "fp16": {"enabled": False}, "bf16": {"enabled": False}}
DS_PATHS = [(k,) for k in DS_CONFIG] + [("zero_optimization", k) for k in DS_CONFIG["zero_optimization"]] + \
    [("fp16", "enabled"), ("bf16", "enabled"), ("fp16", "loss_scale"), ("fp16", "initial_scale_power")]
DS_SIZES = [("train_batch_size",), ("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",),
            ("zero_optimization", "stage"), ("zero_optimization", "reduce_bucket_size")]
# The fields of the exported GPT-2 config.json that import-hf reads.
HF_KEYS = ["model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
           "activation_function", "resid_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range",
           "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "tie_word_embeddings"]
HF_SIZES = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"]
# The entries of meta.json that loading, export and eval read.
META_PATHS = [("files",), ("checksums",), ("layout",), ("layout", "tp"), ("layout", "dp"), ("layout", "zero"),
              ("config",), ("config", "model"), ("config", "data"), ("config", "model", "hidden_size"),
              ("config", "model", "num_layers"), ("config", "model", "num_attention_heads"),
              ("config", "model", "seq_length"), ("config", "model", "untie_embeddings_and_output_weights"),
              ("config", "data", "vocab_file"), ("config", "data", "split"), ("vocab_size",), ("padded_vocab",),
              ("params",), ("iteration",), ("consumed_samples",), ("tokens",), ("data_state",), ("scaler",),
              ("tokenizer",), ("non_finite",), ("format",)]
META_SIZES = [("layout", "tp"), ("layout", "pp"), ("config", "model", "hidden_size"), ("config", "model", "num_layers"),
              ("config", "model", "num_attention_heads"), ("config", "model", "ffn_hidden_size"),
              ("config", "model", "seq_length"), ("vocab_size",), ("padded_vocab",), ("iteration",),
              ("consumed_samples",)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The files to damage (originals; tests damage copies): a corpus, checkpoints of the tiny model at
    iterations 2 and 4, its Hugging Face export, and a checkpoint of a model trained on NullTokenizer data
    (its tokenizer travels with it: eval can read text)."""
    root = tmp_path_factory.mktemp("originals")
    hostile.write_corpus(str(root / "c"), hostile.docs_of(40, VOCAB))
    assert runs.train("--train-iters", "4", "--save", str(root / "ck"), "--save-interval", "2") == 0
    assert run_cli("export-hf", "--load", str(root / "ck"), "--output", str(root / "hf"))[0] == 0
    assert runs.train("--no-mock-data", "--data-path", str(root / "c"), *NULL_TOKENIZER, "--train-iters", "1",
                      "--save", str(root / "null_ck")) == 0
    return root


@pytest.fixture
def work(files, tmp_path) -> Path:
    for name in os.listdir(files):
        src = files / name
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, tmp_path / name)
    return tmp_path


def _index_with_code(w: Path, code: int) -> list:
    with open(w / "c.idx", "r+b") as fh:   # the dtype code: byte 17 of the header
        fh.seek(17)
        fh.write(struct.pack("<B", code))
    return ["train", *runs.TINY, "--no-mock-data", "--data-path", str(w / "c"), *NULL_TOKENIZER, "--train-iters", "1"]


def _meta(w: Path, edit) -> Path:
    meta_file = w / "ck" / "iter_0000004" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(edit(meta)))
    return w / "ck" / "iter_0000004"


def _resealed(w: Path, edit) -> Path:
    path = _meta(w, edit)
    reseal(path)
    return path


@pytest.mark.parametrize("case,setup,message", [
    ("empty corpus", lambda w: (hostile.write_corpus(str(w / "e"), []),
                                ["train", *runs.TINY, "--no-mock-data", "--data-path", str(w / "e"),
                                 *NULL_TOKENIZER, "--train-iters", "1"])[1],
     r"e: the corpus holds no documents"),
    ("split without training data", lambda w: ["train", *runs.TINY, "--no-mock-data", "--data-path", str(w / "c"),
                                               *NULL_TOKENIZER, "--split", "1,99,0", "--train-iters", "1"],
     r"--split 1,99,0 leaves no training documents \(of 37\)"),
    ("NaN blend weight", lambda w: ["train", *runs.TINY, "--no-mock-data", "--data-path", "nan", str(w / "c"),
                                    "1", str(w / "c"), *NULL_TOKENIZER, "--train-iters", "1"],
     r"--data-path weights must be finite"),
    ("float64 .bin", lambda w: _index_with_code(w, 7), r"c.idx: dtype code 7 \(float64\) holds no token ids"),
    ("--text-file not UTF-8", lambda w: ((w / "t.txt").write_bytes(b"caf\xe9\nok"),
                                          ["eval", "--load", str(w / "null_ck"), "--text-file", str(w / "t.txt")])[1],
     r"t.txt:1: not UTF-8 at byte 4"),
    ("truncated safetensors", lambda w: (os.truncate(w / "hf" / "model.safetensors", 100),
                                         ["import-hf", "--input", str(w / "hf"), "--save", str(w / "imp")])[1],
     r"hf/model.safetensors: not a readable safetensors file"),
    ("malformed config.json", lambda w: ((w / "hf" / "config.json").write_text('{"model_type": "gpt2", "n_embd": '),
                                         ["import-hf", "--input", str(w / "hf"), "--save", str(w / "imp")])[1],
     r"hf/config.json: not valid JSON"),
    ("meta.json null", lambda w: ["eval", "--load", str(_meta(w, lambda m: None)), "--text-file", str(w / "c.idx")],
     r"iter_0000004 is unusable: meta.json is malformed: the file is null, expected a JSON object"),
    ("meta.json: a resume position beyond the data", lambda w: [
        "train", *runs.TINY, "--load", str(_resealed(w, lambda m: {**m, "consumed_samples": 10 ** 6})),
        "--train-iters", "6"],
     r"iter_0000004 resumes at sample 1,000,000 \(iteration 4\): 6 iterations would need 1,000,008 samples of a "
     r"data stream of 24"),
    ("meta.json: a model shape its shards do not have", lambda w: [
        "export-hf", "--load", str(_resealed(w, lambda m: {**m, "config": {
            **m["config"], "model": {**m["config"]["model"], "ffn_hidden_size": 64}}})), "--output", str(w / "out")],
     r"iter_0000004: layers.0.mlp.fc1.weight has shape \(128, 32\), its config's model needs \(64, 32\)"),
    ("meta.json edited and re-sealed", lambda w: [
        "export-hf", "--load", str(_resealed(w, lambda m: {**m, "layout": {**m["layout"], "tp": "2"}})),
        "--output", str(w / "out")],
     r"iter_0000004 is unusable: meta.json is malformed: layout.tp is '2', expected an integer >= 1"),
])
def test_file_side_bad_input_is_one_error_line(work, case, setup, message):
    """Rows: an empty corpus, a split that leaves no training data, a NaN blend weight, a float64 .bin, a
    --text-file that is not UTF-8, a truncated safetensors or malformed config.json given to import-hf, a
    meta.json that is `null` or edited: each ended in a Python traceback."""
    import re
    argv = setup(work)
    before = runs.snapshot(work)
    rc, _, err = run_cli(*argv)
    assert one_error_line(rc, err), err
    assert re.search(message, err), err
    after = runs.snapshot(work)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not (work / "imp").exists() and not (work / "out").exists()


def _changed_nothing(before: dict, root: Path) -> bool:
    after = runs.snapshot(root)
    return {k: v for k, v in after.items() if k in before} == before


@fuzz(40)
@given(how=hostile.edits(DS_PATHS, sizes=DS_SIZES))
def test_hostile_ds_config(tmp_path_factory, how):
    """--deepspeed_config with a value of any type at any key, a key removed, the file cut short or a bit
    flipped: the run trains or stops with one line naming the file."""
    d = tmp_path_factory.mktemp("ds")
    text, _ = damage_json(json.dumps(DS_CONFIG), how)
    write_damaged(d / "ds.json", text)
    before = runs.snapshot(d)
    rc, _, err = run_cli("train", *runs.TINY, "--deepspeed", "--deepspeed_config", str(d / "ds.json"),
                         "--train-iters", "1", "--eval-iters", "0")
    assert rc == 0 or one_error_line(rc, err), (text, err)
    assert _changed_nothing(before, d)
    shutil.rmtree(d)


@fuzz(150)
@given(target=st.sampled_from(["config.json", "config.json", "model.safetensors"]),
       how=hostile.edits([(k,) for k in HF_KEYS], sizes=[(k,) for k in HF_SIZES]),
       cut=st.booleans(), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7), header=st.booleans())
def test_hostile_hf_directory(files, tmp_path_factory, target, how, cut, where, bit, header):
    """import-hf of a directory whose config.json has a value of any type at any field, a field removed, or
    is cut short or bit-flipped; or whose model.safetensors is cut short or has a bit flipped in its header
    (or anywhere): a complete checkpoint, or one line and no checkpoint directory left behind."""
    d = tmp_path_factory.mktemp("hf")
    src = d / "hf"
    shutil.copytree(files / "hf", src)
    if target == "config.json":
        text, _ = damage_json((src / "config.json").read_text(), how)
        write_damaged(src / "config.json", text)
    else:
        raw = bytearray((src / "model.safetensors").read_bytes())
        at = int(where * (8 + struct.unpack("<Q", raw[:8])[0] if header else len(raw)))
        if cut:
            raw = raw[:at]
        else:
            raw[at] ^= 1 << bit
        (src / "model.safetensors").write_bytes(bytes(raw))
    before = runs.snapshot(d)
    rc, _, err = run_cli("import-hf", "--input", str(src), "--save", str(d / "ck"))
    if rc == 0:
        assert run_cli("checkpoint", "verify", str(d / "ck"))[0] == 0
    else:
        assert one_error_line(rc, err) and not (d / "ck").exists(), err
    assert _changed_nothing(before, d)
    shutil.rmtree(d)


@fuzz(80)
@given(how=hostile.edits(META_PATHS, sizes=META_SIZES), seal=st.booleans(),
       command=st.sampled_from(["verify", "info", "export-hf", "eval", "train"]))
def test_hostile_meta_json(files, tmp_path_factory, how, seal, command):
    """A checkpoint's meta.json with a value of any type at any path, an entry removed (re-sealed, as someone
    who edits it would, or not), cut short or bit-flipped, read by verify, checkpoint-info, export-hf, eval
    and a resuming train: each succeeds (a resume may fall back to the previous checkpoint) or ends in one
    line, and the checkpoint is unchanged."""
    d = tmp_path_factory.mktemp("meta")
    shutil.copytree(files / "ck", d / "ck")
    path = d / "ck" / "iter_0000004"
    text, edited = damage_json((path / "meta.json").read_text(), how)
    write_damaged(path / "meta.json", text)
    if edited and seal and isinstance(json.loads(text), dict) and isinstance(json.loads(text).get("files"), dict):
        try:
            reseal(path)
        except (KeyError, TypeError, AttributeError, ValueError):
            pass   # checksums no longer a mapping of the files: left as damaged
    before = runs.snapshot(d)
    argv = {"verify": ["checkpoint", "verify", str(d / "ck")], "info": ["checkpoint-info", str(d / "ck")],
            "export-hf": ["export-hf", "--load", str(d / "ck"), "--output", str(d / "hf")],
            "eval": ["eval", "--load", str(d / "ck"), "--text-file", str(path / "meta.json")],
            "train": ["train", *runs.TINY, "--load", str(d / "ck"), "--train-iters", "5", "--eval-iters", "0"]}
    rc, _, err = run_cli(*argv[command])
    assert rc == 0 or one_error_line(rc, err), (text[:2000], err)
    assert _changed_nothing(before, d)
    shutil.rmtree(d)


@fuzz(30)
@given(file=st.sampled_from([".idx", ".bin"]), how=st.tuples(st.sampled_from(["cut", "flip"]),
                                                             st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
       high=st.booleans())
def test_hostile_data_files(files, tmp_path_factory, file, how, high):
    """`gpt3d train` on a .bin/.idx cut short or with a bit flipped anywhere (in a token's high byte: an id
    beyond the vocabulary): it trains, or stops before training with one line naming the file."""
    d = tmp_path_factory.mktemp("data")
    for ext in (".bin", ".idx"):
        shutil.copyfile(files / f"c{ext}", d / f"c{ext}")
    raw = bytearray((d / f"c{file}").read_bytes())
    at = int(how[1] * len(raw))
    if how[0] == "cut":
        raw = raw[:at]
    else:
        raw[at | 1 if file == ".bin" and high else at] ^= 1 << how[2]
    (d / f"c{file}").write_bytes(bytes(raw))
    before = runs.snapshot(d)
    rc, _, err = run_cli("train", *runs.TINY, "--no-mock-data", "--data-path", str(d / "c"), *NULL_TOKENIZER,
                         "--split", "1,0,0", "--train-iters", "1", "--eval-iters", "0")
    assert rc == 0 or (one_error_line(rc, err) and str(d / "c.") in err), err
    assert _changed_nothing(before, d)
    shutil.rmtree(d)


@fuzz(20)
@given(text=st.text(max_size=60), encoding=st.sampled_from(["utf-8", "utf-16", "latin-1", "cp1252", "raw"]),
       raw=st.binary(max_size=40), command=st.sampled_from(["eval", "preprocess"]))
def test_hostile_text_encodings(files, tmp_path_factory, text, encoding, raw, command):
    """Text in any encoding (or raw bytes) as eval's --text-file or inside a preprocess JSONL line: scored or
    tokenized, or one line naming the file (and line) that is not UTF-8; existing outputs unchanged."""
    d = tmp_path_factory.mktemp("text")
    data = raw if encoding == "raw" else text.encode(encoding, "replace")
    if command == "eval":
        (d / "t.txt").write_bytes(data)
        argv = ["eval", "--load", str(files / "null_ck"), "--text-file", str(d / "t.txt")]
    else:
        for ext in (".bin", ".idx"):   # an existing output the run must not touch unless it succeeds
            shutil.copyfile(files / f"c{ext}", d / f"out_text_document{ext}")
        (d / "in.jsonl").write_bytes(b'{"text": "' + data.replace(b"\\", b"").replace(b'"', b"") + b'"}\n')
        argv = ["preprocess", "--input", str(d / "in.jsonl"), "--output-prefix", str(d / "out"),
                *NULL_TOKENIZER, "--log-interval", "1000"]
    before = runs.snapshot(d)
    rc, _, err = run_cli(*argv)
    if rc != 0:
        assert one_error_line(rc, err), err
        assert runs.snapshot(d) == before
    shutil.rmtree(d)
