"""Tokenizer types, portable tokenizer files, and `preprocess` over every input format (issue 16).

Every tokenizer here is trained in the test on generated text (tests/support/textgen.py, fixtures `texts`,
`hf_bpe`, `spm_model` in tests/conftest.py): a byte-level BPE (`tokenizers`) whose vocabulary exceeds 65,535
ids (int32 .bin) and a SentencePiece model (`sentencepiece`, uint16 .bin).
Expected .bin/.idx bytes come from a writer in this file that follows Megatron's preprocess rule
(sentences as sequences, eod counted in the last one, a doc_idx boundary for every document).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from gpt3d.data import corpus
from gpt3d.data.indexed import MMapIndexedDataset
from gpt3d.data.preprocess import main as preprocess_main
from gpt3d.data.preprocess import preprocess
from gpt3d.data.tokenizer import TokenizerError, build_tokenizer, load_from_dir

from tests.support.textgen import make_texts, tokenizer_flags


def flags_to_kw(flags: list) -> dict:
    return {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}


# ----- the tokenizer types ------------------------------------------------------------------------------------------
def test_huggingface_tokenizer_ids_eod_and_size(hf_bpe, texts):
    from tokenizers import Tokenizer
    tok = build_tokenizer(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf_bpe)
    ref = Tokenizer.from_file(os.path.join(hf_bpe, "tokenizer.json"))
    for t in texts[:50]:
        assert tok.encode(t) == ref.encode(t).ids and tok.encode(t)[0] == 0      # post-processor's <s>
    assert tok.encode_batch(texts[:50]) == [tok.encode(t) for t in texts[:50]]
    assert tok.vocab_size == 66000 and (tok.eod, tok.eod_token) == (1, "</s>")   # eos found by name
    assert tok.decode(tok.encode("Kato naïve")) == "<s>Kato naïve"
    file_only = build_tokenizer(tokenizer_type="HuggingFaceTokenizer",
                                tokenizer_model=os.path.join(hf_bpe, "tokenizer.json"))
    assert file_only.fingerprint == tok.fingerprint


def test_sentencepiece_types_follow_megatron(spm_model, texts):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    gpt = build_tokenizer(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=spm_model)
    llama = build_tokenizer(tokenizer_type="Llama2Tokenizer", tokenizer_model=spm_model)
    meg = build_tokenizer(tokenizer_type="SentencePieceTokenizer", tokenizer_model=spm_model)
    for t in texts[:30]:
        assert gpt.encode(t) == sp.encode_as_ids(t)
        assert llama.encode(t) == [sp.bos_id()] + sp.encode_as_ids(t)
        assert meg.encode(t) == sp.encode_as_ids(t)
    assert (gpt.vocab_size, gpt.eod) == (300, sp.eos_id())
    # Megatron's SentencePieceTokenizer: <CLS> <SEP> <EOD> <MASK> <PAD> appended (the model has <s>, </s>)
    assert meg.vocab_size == 305 and meg.eod == 302 and meg.special["<s>"] == sp.bos_id()
    text = "kato<EOD> mo </s>x"
    assert meg.encode(text) == (sp.encode_as_ids("kato") + [302] + sp.encode_as_ids(" mo ") + [sp.eos_id()]
                                + sp.encode_as_ids("x"))
    assert meg.encode_batch([text, "kato"]) == [meg.encode(text), sp.encode_as_ids("kato")]


def test_null_tokenizer_follows_megatron():
    tok = build_tokenizer(tokenizer_type="NullTokenizer", vocab_size=1000)
    assert (tok.vocab_size, tok.eod) == (1001, 1000)
    assert tok.encode("5 17 999") == [5, 17, 999] and tok.decode([5, 17]) == "5 17"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.encode("1 1001")
    with pytest.raises(TokenizerError, match="space-separated integer"):
        tok.encode("1 two")


def test_huggingface_tokenizer_ignores_stored_truncation_and_padding(hf_bpe, texts, tmp_path):
    """A tokenizer.json saved with truncation and padding (here at 8) still gives every id of a document and
    no pad ids, as Megatron's `AutoTokenizer(text).input_ids` does; so does the exported tokenizer."""
    from tokenizers import Tokenizer

    from gpt3d.data.hf_tokenizer import export_tokenizer
    ref = Tokenizer.from_file(os.path.join(hf_bpe, "tokenizer.json"))
    cut = Tokenizer.from_file(os.path.join(hf_bpe, "tokenizer.json"))
    cut.enable_truncation(8)
    cut.enable_padding(length=8, pad_id=2, pad_token="<pad>")
    (tmp_path / "cut").mkdir()
    cut.save(str(tmp_path / "cut" / "tokenizer.json"))
    assert json.loads((tmp_path / "cut" / "tokenizer.json").read_text())["truncation"]["max_length"] == 8
    long_doc = max(texts, key=len)
    assert len(ref.encode(long_doc).ids) > 15
    tok = build_tokenizer(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "cut"))
    assert tok.encode(long_doc) == ref.encode(long_doc).ids
    assert tok.encode("hi") == ref.encode("hi").ids and 2 not in tok.encode("hi")
    assert tok.encode_batch([long_doc, "hi"]) == [ref.encode(long_doc).ids, ref.encode("hi").ids]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": long_doc}) + "\n" + json.dumps({"text": "hi"}) + "\n")
    assert preprocess_main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "o"),
                            "--tokenizer-type", "HuggingFaceTokenizer",
                            "--tokenizer-model", str(tmp_path / "cut")]) == 0
    ds = MMapIndexedDataset(str(tmp_path / "o_text_document"))
    assert ds[0].tolist() == ref.encode(long_doc).ids and ds[1].tolist() == ref.encode("hi").ids
    (tmp_path / "hf").mkdir()
    export_tokenizer(tok, str(tmp_path / "hf"), 128)
    saved = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf(long_doc)["input_ids"] == tok.encode(long_doc) and hf("hi")["input_ids"] == tok.encode("hi")


def test_huggingface_tokenizer_warns_once_where_transformers_may_differ(hf_bpe, tmp_path, capfd):
    """A tokenizer_config.json with a model-specific tokenizer_class or add_bos/eos_token, which AutoTokenizer
    (Megatron's HuggingFaceTokenizer) may apply on top of tokenizer.json: one warning, workers included."""
    (tmp_path / "c.jsonl").write_text('{"text": "kato mo"}\n' * 5)
    for name, cfg, expect in [
            ("llama", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "eos_token": "</s>"},
             "sets tokenizer_class LlamaTokenizer and add_bos_token true, which transformers' AutoTokenizer"),
            ("eos", {"tokenizer_class": "PreTrainedTokenizerFast", "add_eos_token": True}, "sets add_eos_token true"),
            ("plain", {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}, None)]:
        shutil.copytree(hf_bpe, tmp_path / name)
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(cfg))
        capfd.readouterr()
        assert preprocess_main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / name),
                                "--workers", "2", "--tokenizer-type", "HuggingFaceTokenizer",
                                "--tokenizer-model", str(tmp_path / name)]) == 0
        err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
        if expect is None:
            assert err == [], err
        else:
            assert len(err) == 1 and err[0].startswith("gpt3d: warning: ") and expect in err[0], err
            assert "ids may differ from gpt3d's" in err[0]


@pytest.mark.parametrize("kind", ["bpe", "spm", "null"])
def test_save_files_load_from_dir_and_fingerprint(kind, hf_bpe, spm_model, tmp_path, texts):
    """Files copied with their manifest rebuild the same tokenizer anywhere; the fingerprint follows content."""
    kw = {"bpe": dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf_bpe),
          "spm": dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=spm_model),
          "null": dict(tokenizer_type="NullTokenizer", vocab_size=500)}[kind]
    tok = build_tokenizer(**kw)
    manifest = tok.save_files(str(tmp_path / "a"))
    json.loads(json.dumps(manifest))                                  # JSON-able, for meta.json
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    back = load_from_dir(str(tmp_path / "moved"), manifest)
    assert back.fingerprint == tok.fingerprint == manifest["fingerprint"]
    sample = ["3 4 5"] if kind == "null" else texts[:20]
    assert back.encode_batch(sample) == tok.encode_batch(sample) and back.eod == tok.eod
    if kind == "null":
        assert build_tokenizer(tokenizer_type="NullTokenizer", vocab_size=501).fingerprint != tok.fingerprint
        return
    name = next(iter(manifest["files"]))
    with open(tmp_path / "moved" / name, "ab") as fh:
        fh.write(b" ")
    with pytest.raises(TokenizerError, match="does not match its recorded sha256"):
        load_from_dir(str(tmp_path / "moved"), manifest)
    other = build_tokenizer(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=spm_model)
    assert other.fingerprint != tok.fingerprint


# ----- preprocess: Megatron's .idx, every input format --------------------------------------------------------
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
    assert len(lines) >= 3 and all("docs/s" in ln and "MB/s" in ln and "tokens/s" in ln for ln in lines)
    # "" still encodes to [<s>] (the post-processor's), as with Megatron's HuggingFaceTokenizer: no empty docs
    assert s["docs"] == len(texts) and s["empty"] == 0 and s["tokens"] > len(texts)
    assert preprocess_main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "o"),
                            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_bpe,
                            "--log-interval", "200"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "tokens/s" in out[0] and out[-1].startswith(f"processed {len(texts)} documents")
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
        with pytest.raises(corpus.DataError, match="c.jsonl.zst: truncated zstd stream after line"):
            list(corpus.chunks(str(tmp_path / "c.jsonl.zst"), ["text"]))


def test_append_eod_needs_an_eos(tmp_path, capsys):
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n')
    rc = preprocess_main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "o"),
                          "--append-eod", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                          str(tmp_path / "t.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no end-of-document (eos) token" in err[0]


def test_gpt2_vocab_without_endoftext_has_no_eod(hf_bpe, tmp_path, capsys):
    """Megatron's GPT2BPETokenizer needs <|endoftext|>; gpt3d never stands in the last id (a real token): the
    eod stays unset and --append-eod is refused with one line naming the vocab file."""
    from tokenizers import Tokenizer
    Tokenizer.from_file(os.path.join(hf_bpe, "tokenizer.json")).model.save(str(tmp_path))
    vocab, merges = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    assert "<|endoftext|>" not in json.loads(Path(vocab).read_text())
    tok = build_tokenizer(vocab, merges)
    assert tok.eod is None and tok.eod_token is None
    (tmp_path / "c.jsonl").write_text('{"text": "kato mo"}\n')
    flags = ["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "o"), "--vocab-file", vocab,
             "--merge-file", merges]
    assert preprocess_main(flags + ["--append-eod"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (f"gpt3d: error: GPT2BPETokenizer vocab.json, merges.txt has no "
                                        f"end-of-document (eos) token; {vocab} has no <|endoftext|> entry"), err
    assert not (tmp_path / "o_text_document.bin").exists()
    assert preprocess_main(flags) == 0                                # ids alone need no eod
    assert MMapIndexedDataset(str(tmp_path / "o_text_document"))[0].tolist() == tok.encode("kato mo")
    with_eod = json.loads(Path(vocab).read_text())
    with_eod["<|endoftext|>"] = len(with_eod)
    Path(vocab).write_text(json.dumps(with_eod))
    tok = build_tokenizer(vocab, merges)
    assert (tok.eod, tok.eod_token) == (len(with_eod) - 1, "<|endoftext|>")


# ----- export to transformers, and the checkpoint side -------------------------------------------------------
@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                                  "NullTokenizer"])
def test_exported_tokenizer_encodes_like_gpt3d(kind, hf_bpe, spm_model, texts, tmp_path):
    """The types the end-to-end test does not train with: AutoTokenizer on the export gives gpt3d's ids."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    from gpt3d.data.hf_tokenizer import export_tokenizer
    if kind == "GPT2BPETokenizer":            # vocab.json + merges.txt of the BPE trained above
        (tmp_path / "src").mkdir()
        Tokenizer.from_file(os.path.join(hf_bpe, "tokenizer.json")).model.save(str(tmp_path / "src"))
        vocab = json.loads((tmp_path / "src" / "vocab.json").read_text())
        (tmp_path / "src" / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": len(vocab)}))
        tok = build_tokenizer(str(tmp_path / "src" / "vocab.json"), str(tmp_path / "src" / "merges.txt"))
        assert tok.eod == len(vocab)
    elif kind == "NullTokenizer":
        tok = build_tokenizer(tokenizer_type=kind, vocab_size=300)
        texts = [" ".join(str((i * 7 + j) % 301) for j in range(i % 9)) for i in range(40)]
    else:
        tok = build_tokenizer(tokenizer_type=kind, tokenizer_model=spm_model)
    (tmp_path / "hf").mkdir()
    info = export_tokenizer(tok, str(tmp_path / "hf"), 128)
    assert info["eos_token_id"] == tok.eod
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    # AutoTokenizer names the eod (and a bos) with gpt3d's ids, yet their strings in text stay ordinary text
    assert hf.eos_token_id == tok.eod and (hf.bos_token_id == tok.bos or tok.bos is None), (hf.eos_token_id, tok.eod)
    literal = [f"a{hf.eos_token}b {hf.bos_token} c".strip()] if tok.eod is not None else []
    if kind == "NullTokenizer":
        texts = texts + [f"{tok.eod} 1 {tok.eod}"]
    else:
        texts = texts[:60] + ["<s> literal </s> <unk> <|endoftext|>", "  spaces   and\ttabs\n"] + literal
    for t in texts:
        assert hf(t)["input_ids"] == tok.encode(t), t


def test_export_verifies_text_decoded_from_the_training_data(spm_model, texts, tmp_path):
    """export-hf checks the exported tokenizer on text decoded from the checkpoint's .bin/.idx too (beside
    the fixed probes): a difference only such text shows refuses the export; gone or mock data is skipped."""
    from gpt3d.data.hf_tokenizer import data_sample, export_tokenizer
    from gpt3d.data.spm_tokenizer import GPTSentencePieceTokenizer
    tok = build_tokenizer(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=spm_model)
    docs = [t for t in texts if t][:300]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    preprocess(str(tmp_path / "c.jsonl"), str(tmp_path / "d"), tokenizer_type="GPTSentencePieceTokenizer",
               tokenizer_model=spm_model, progress=False)
    prefix = str(tmp_path / "d_text_document")
    sample = data_sample({"data_path": ["0.7", prefix, "0.3", str(tmp_path / "gone")]}, tok, count=20)
    ds = MMapIndexedDataset(prefix)
    assert sample == [tok.decode(ds[i][:512].tolist()) for i in range(0, 300, 30)]
    assert sample[1] == docs[30]
    assert data_sample({"data_path": [prefix], "mock_data": True}, tok) == []
    assert data_sample({"data_path": [str(tmp_path / "gone")]}, tok) == []

    class Differs(GPTSentencePieceTokenizer):              # encodes one training document differently
        def encode(self, text):
            return super().encode(text)[::-1] if text == docs[30] else super().encode(text)
    (tmp_path / "a").mkdir()
    export_tokenizer(Differs(spm_model), str(tmp_path / "a"), 128)          # the probes alone pass
    with pytest.raises(TokenizerError, match="refusing to export a tokenizer that differs from training"):
        export_tokenizer(Differs(spm_model), str(tmp_path / "a"), 128, sample)


def test_export_refuses_what_cannot_match(tmp_path, texts):
    import sentencepiece as spm

    from gpt3d.data.hf_tokenizer import export_tokenizer
    spm.SentencePieceTrainer.train(sentence_iterator=iter([t for t in texts if t]), model_prefix=str(tmp_path / "w"),
                                   vocab_size=200, model_type="word", minloglevel=2)
    tok = build_tokenizer(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=str(tmp_path / "w.model"))
    with pytest.raises(TokenizerError, match="word/char.*cannot export"):
        export_tokenizer(tok, str(tmp_path), 128)


def test_tokenizer_for_checkpoint_prefers_the_carried_copy(spm_model, hf_bpe, tmp_path):
    from gpt3d.data.tokenizer import tokenizer_for_checkpoint
    tok = build_tokenizer(tokenizer_type="SentencePieceTokenizer", tokenizer_model=spm_model)
    manifest = tok.save_files(str(tmp_path / "iter_0000010" / "tokenizer"))
    data = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "/moved/away/sp.model"}
    got = tokenizer_for_checkpoint(data, 384, None, str(tmp_path / "iter_0000010"), manifest)
    assert got.fingerprint == tok.fingerprint
    # flags win over the carried copy; a tokenizer larger than the model's vocabulary is refused
    with pytest.raises(TokenizerError, match="has 66000 ids but the model's vocabulary is 384"):
        tokenizer_for_checkpoint(data, 384, {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": hf_bpe},
                                 str(tmp_path / "iter_0000010"), manifest)
    with pytest.raises(TokenizerError, match="sp.model"):
        tokenizer_for_checkpoint(data, 384)           # recorded path gone, no copy: named in the error
    with pytest.raises(TokenizerError, match="names no tokenizer"):
        tokenizer_for_checkpoint({}, 384)


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
