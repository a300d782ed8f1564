"""`preprocess` over every input format (JSONL, .gz, .zst, Parquet, shards) and its bad-input errors (issue 16).

Tokenizers are trained in the test on generated text (fixtures `texts`, `hf_bpe`, `spm_model` in
tests/conftest.py). Expected .bin/.idx bytes come from a writer in this file that follows Megatron's preprocess
rule (sentences as sequences, eod counted in the last one, a doc_idx boundary for every document).
"""
from __future__ import annotations
import gzip
import io
import json
import os
import struct
from pathlib import Path
import numpy as np
import pytest

from gpt3d.errors import DataError
from gpt3d.data import corpus
from gpt3d.data.indexed import MMapIndexedDataset
from gpt3d.commands.preprocess import main as preprocess_main
from gpt3d.data.preprocess import preprocess
from gpt3d.tokenizers.factory import build_tokenizer

from tests.support.textgen import make_texts, tokenizer_flags


def flags_to_kw(flags: list) -> dict:
    return {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}


def reference_files(prefix: Path, docs: list, tok, append_eod: bool, width) -> None:
    """Megatron's rule written out independently: non-empty sentences are sequences, the eod is counted in
    the last one, and every document (empty too) closes a doc_idx entry."""
    tokens, sizes, doc_idx = [], [], [0]
    for doc in docs:
        ids, lens = [], []
        for sentence in [doc] if isinstance(doc, str) else doc:
            s = tok.encode(sentence)
            if s:
                ids += s
                lens.append(len(s))
        if ids and append_eod:
            ids.append(tok.eod)
            lens[-1] += 1
        tokens += ids
        sizes += lens
        doc_idx.append(len(sizes))
    code, item = {np.uint16: (8, 2), np.int32: (4, 4)}[width]
    Path(str(prefix) + ".bin").write_bytes(np.asarray(tokens, dtype=width).tobytes())
    pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * item if sizes else []
    Path(str(prefix) + ".idx").write_bytes(
        b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(sizes), len(doc_idx))
        + struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *map(int, pointers))
        + struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def write_inputs(d: Path, docs: list) -> dict:
    """The same documents as JSONL, .jsonl.gz, .jsonl.zst, Parquet, and JSONL split into 3 shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    d.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"text": t, "id": i}, ensure_ascii=i % 2 == 0) + "\n" for i, t in enumerate(docs))
    (d / "c.jsonl").write_text(data, encoding="utf-8")
    (d / "c.jsonl.gz").write_bytes(gzip.compress(data.encode()))
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data.encode()))
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), str(d / "c.parquet"), row_group_size=64)
    lines = data.splitlines(keepends=True)
    (d / "shards").mkdir(exist_ok=True)
    for k in range(3):
        (d / "shards" / f"part-{k}.jsonl").write_text("".join(lines[k * len(lines) // 3:(k + 1) * len(lines) // 3]))
    return {f: str(d / f) for f in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet")}


def read_pair(prefix: str) -> tuple:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_preprocess_every_format_gives_megatrons_bytes(kind, hf_bpe, spm_model, texts, tmp_path, monkeypatch):
    flags = tokenizer_flags(kind, hf_bpe, spm_model)
    tok = build_tokenizer(**flags_to_kw(flags))
    docs = texts[:150]
    inputs = write_inputs(tmp_path / "in", docs)
    width = np.int32 if kind == "bpe" else np.uint16
    reference_files(tmp_path / "ref", docs, tok, True, width)
    expect = read_pair(str(tmp_path / "ref"))
    for name, path in inputs.items():
        assert preprocess_main(["--input", path, "--output-prefix", str(tmp_path / name), "--append-eod",
                                *flags]) == 0
        assert read_pair(str(tmp_path / f"{name}_text_document")) == expect, name
    ds = MMapIndexedDataset(str(tmp_path / "c.jsonl_text_document"))
    assert ds.dtype == width and len(ds.doc_idx) == len(docs) + 1            # empty documents kept
    # two workers, a quoted glob of shards into one output, and tiny chunks (lines split across reads)
    assert preprocess_main(["--input", str(tmp_path / "in" / "shards" / "part-*.jsonl"), "--output-prefix",
                            str(tmp_path / "glob"), "--append-eod", "--workers", "2", *flags]) == 0
    assert read_pair(str(tmp_path / "glob_text_document")) == expect
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 100)
    monkeypatch.setattr(corpus, "PARQUET_ROWS", 7)
    for name in ("c.jsonl.zst", "c.parquet"):
        assert preprocess_main(["--input", inputs[name], "--output-prefix", str(tmp_path / "small"),
                                "--append-eod", *flags]) == 0
        assert read_pair(str(tmp_path / "small_text_document")) == expect
    # one output per shard
    assert preprocess_main(["--input", str(tmp_path / "in" / "shards" / "*.jsonl"), "--output-prefix",
                            str(tmp_path / "per" / "{name}"), *flags]) == 0
    assert sorted(os.listdir(tmp_path / "per")) == sorted(f"part-{k}_text_document{e}" for k in range(3)
                                                          for e in (".bin", ".idx"))


def test_preprocess_sentence_lists_and_several_keys(hf_bpe, tmp_path):
    """A list of strings under a key is Megatron's sentence list: one sequence per non-empty sentence."""
    tok = build_tokenizer(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf_bpe)
    docs = [["Kato mo.", "", "Seri lu!"], [], ["Ba."], "plain text", ""]
    rows = [{"text": d, "title": f"title {i}" if i % 2 else ""} for i, d in enumerate(docs)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert preprocess_main(["--input", str(tmp_path / "s.jsonl"), "--output-prefix", str(tmp_path / "o"),
                            "--json-keys", "text", "title", "--append-eod", "--tokenizer-type",
                            "HuggingFaceTokenizer", "--tokenizer-model", hf_bpe]) == 0
    for key in ("text", "title"):
        reference_files(tmp_path / f"ref_{key}", [r[key] for r in rows], tok, True, np.int32)
        assert read_pair(str(tmp_path / f"o_{key}_document")) == read_pair(str(tmp_path / f"ref_{key}")), key


def test_preprocess_dictionary_encoded_parquet(hf_bpe, texts, tmp_path):
    """Categorical (dictionary<string>) columns, plain or in sentence lists, read as their strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_bpe]
    docs = texts[:40] * 2
    lists = [[t, "", docs[i - 1]] for i, t in enumerate(docs)]
    sentences = pa.array(lists).cast(pa.list_(pa.dictionary(pa.int32(), pa.string())))
    pq.write_table(pa.table({"text": pa.array(docs).dictionary_encode(), "s": sentences}),
                   str(tmp_path / "d.parquet"), row_group_size=16)
    assert pa.types.is_dictionary(pq.ParquetFile(str(tmp_path / "d.parquet")).schema_arrow.field("text").type)
    pq.write_table(pa.table({"text": docs, "s": lists}), str(tmp_path / "p.parquet"))
    for name in ("d", "p"):
        assert preprocess_main(["--input", str(tmp_path / f"{name}.parquet"), "--output-prefix",
                                str(tmp_path / name), "--json-keys", "text", "s", "--append-eod", *flags]) == 0
    for key in ("text", "s"):
        assert read_pair(str(tmp_path / f"d_{key}_document")) == read_pair(str(tmp_path / f"p_{key}_document"))


def test_preprocess_progress_lines_and_summary(hf_bpe, texts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 4000)          # progress is counted per chunk
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stream = io.StringIO()                     # not a terminal: plain lines every --log-interval documents
    s = preprocess(str(tmp_path / "c.jsonl"), str(tmp_path / "o"), tokenizer_type="HuggingFaceTokenizer",
                   tokenizer_model=hf_bpe, log_interval=100, stream=stream)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3 and all("documents/s" in ln and "MB/s" in ln and "tokens/s" in ln for ln in lines)
    assert all("ETA" in ln for ln in lines[:-1]) and "done" in lines[-1]   # plain JSONL: its size is the total
    # "" still encodes to [<s>] (the post-processor's), as with Megatron's HuggingFaceTokenizer: no empty docs
    assert s["docs"] == len(texts) and s["empty"] == 0 and s["tokens"] > len(texts)
    assert preprocess_main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "o"),
                            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_bpe,
                            "--log-interval", "200"]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()   # progress goes to stderr, the summary alone to stdout
    assert "tokens/s" in captured.err and out == out[-1:] and out[-1].startswith(f"processed {len(texts)} documents")
    assert "MB/s" in out[-1] and "tokens/s" in out[-1] and "(int32)" in out[-1]


def _bad_utf8(d: Path) -> tuple:
    (d / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    return [str(d / "b.jsonl")], f"{d / 'b.jsonl'}:2: not UTF-8 at byte 14"


def _number(d: Path) -> tuple:
    (d / "n.jsonl").write_text('{"text": "ok"}\n\n{"text": 42}\n')
    return [str(d / "n.jsonl")], f"{d / 'n.jsonl'}:3: the value under 'text' is a number, not a string"


def _no_shards(d: Path) -> tuple:
    return [str(d / "nothing-*.jsonl")], "no input files match"


def _int_column(d: Path) -> tuple:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [1, 2]}), str(d / "i.parquet"))
    return [str(d / "i.parquet")], "i.parquet: column 'text' holds int64, not strings"


def _null_row(d: Path) -> tuple:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a", None]}), str(d / "z.parquet"))
    return [str(d / "z.parquet")], "z.parquet:2: the value under 'text' is null, not a string"


def _null_in_list(d: Path) -> tuple:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [["a"], ["b", None]]}), str(d / "l.parquet"))
    return [str(d / "l.parquet")], "l.parquet:2: the value under 'text' is a list with nulls, not strings"


def _truncated_gz(d: Path) -> tuple:
    data = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in make_texts(300)).encode())
    (d / "t.jsonl.gz").write_bytes(data[:len(data) // 2])
    return [str(d / "t.jsonl.gz")], "t.jsonl.gz: cannot read gzip input"


def _truncated_zst(d: Path) -> tuple:
    import zstandard
    text = "".join(json.dumps({"text": t}) + "\n" for t in make_texts(300))
    data = zstandard.ZstdCompressor().compress(text.encode())
    (d / "t.jsonl.zst").write_bytes(data[:len(data) // 2])             # half of a single-frame file
    return [str(d / "t.jsonl.zst")], "t.jsonl.zst: truncated zstd stream after line"


@pytest.mark.parametrize("setup", [_bad_utf8, _number, _no_shards, _int_column, _null_row, _null_in_list,
                                   _truncated_gz, _truncated_zst])
def test_preprocess_bad_input_one_line_exit_2(setup, hf_bpe, tmp_path, capsys):
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_bpe]
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    out = str(tmp_path / "out")
    assert preprocess_main(["--input", str(tmp_path / "good.jsonl"), "--output-prefix", out, *flags]) == 0
    before = read_pair(out + "_text_document")
    inputs, message = setup(tmp_path)
    capsys.readouterr()
    assert preprocess_main(["--input", *inputs, "--output-prefix", out, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt3d: error: ") and message in err[0], err
    assert read_pair(out + "_text_document") == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "spm"])
def test_preprocess_unpaired_surrogate_one_line_exit_2(kind, hf_bpe, spm_model, tmp_path, capsys):
    """`"\\ud800"` is valid JSON but not Unicode text no tokenizer can take: FILE:LINE, exit 2, outputs kept.
    An escaped backslash before "ud800" and a proper surrogate pair (an emoji) are fine."""
    from tokenizers import Tokenizer
    if kind == "gpt2":
        (tmp_path / "src").mkdir()
        Tokenizer.from_file(os.path.join(hf_bpe, "tokenizer.json")).model.save(str(tmp_path / "src"))
        flags = ["--vocab-file", str(tmp_path / "src" / "vocab.json"), "--merge-file",
                 str(tmp_path / "src" / "merges.txt")]
    else:
        flags = tokenizer_flags(kind, hf_bpe, spm_model)
    fine = '{"text": "a \\\\ud800 \\ud83d\\ude42 b"}\n'
    (tmp_path / "good.jsonl").write_text(fine)
    out = str(tmp_path / "out")
    assert preprocess_main(["--input", str(tmp_path / "good.jsonl"), "--output-prefix", out, *flags]) == 0
    before = read_pair(out + "_text_document")
    for name, body, message in [("s.jsonl", fine + '{"text": "x\\ud800y"}\n',
                                 "s.jsonl:2: the value under 'text' holds an unpaired UTF-16 surrogate escape "
                                 "(character 2: '\\ud800')"),
                                ("l.jsonl", fine * 2 + '\n{"text": ["ok", "x\\uDFFF"]}\n',
                                 "l.jsonl:4: the value under 'text' holds an unpaired UTF-16 surrogate escape "
                                 "(sentence 2, character 2: '\\udfff')")]:
        (tmp_path / name).write_text(body)
        capsys.readouterr()
        assert preprocess_main(["--input", str(tmp_path / name), "--output-prefix", out, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("gpt3d: error: ") and message in err[0], err
        assert read_pair(out + "_text_document") == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_zstd_reads_every_frame_and_refuses_a_cut_one(tmp_path):
    """Concatenated frames (zstd's multi-frame files) and skippable frames read whole; a file cut inside
    its second frame, or inside a frame header, is refused."""
    import zstandard
    lines = [json.dumps({"text": t}) + "\n" for t in make_texts(200)]
    frames = [zstandard.ZstdCompressor().compress("".join(part).encode()) for part in (lines[:120], lines[120:])]
    skippable = struct.pack("<II", 0x184D2A50, 3) + b"pad"
    (tmp_path / "m.jsonl.zst").write_bytes(skippable + frames[0] + skippable + frames[1])
    got = b"".join(c.data for c in corpus.chunks(str(tmp_path / "m.jsonl.zst"), ["text"], chunk_bytes=500))
    assert got == "".join(lines).encode()
    for cut in (frames[0] + frames[1][:len(frames[1]) // 2], frames[0] + frames[1][:3]):
        (tmp_path / "c.jsonl.zst").write_bytes(cut)
        with pytest.raises(DataError, match="c.jsonl.zst: truncated zstd stream after line"):
            list(corpus.chunks(str(tmp_path / "c.jsonl.zst"), ["text"]))


def test_preprocess_does_not_import_torch(tmp_path):
    """The CLI imports only the module of the command it runs: preprocess stays free of torch."""
    import subprocess
    import sys
    (tmp_path / "ids.jsonl").write_text('{"text": "1 2 3"}\n{"text": "4 5"}\n')
    code = ("import sys; from gpt3d.cli import main; "
            f"rc = main(['preprocess', '--input', {str(tmp_path / 'ids.jsonl')!r}, '--output-prefix', "
            f"{str(tmp_path / 'out')!r}, '--tokenizer-type', 'NullTokenizer', '--vocab-size', '10', "
            "'--append-eod']); print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "0 False", r.stdout + r.stderr
    assert MMapIndexedDataset(str(tmp_path / "out_text_document"))[1].tolist() == [4, 5, 10]
