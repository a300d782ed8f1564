"""Tokenizer types (Megatron's names and ids), portable tokenizer files, and the tokenizer files export-hf writes.

Every tokenizer here is trained in the test on generated text (tests/support/textgen.py, fixtures `texts`,
`hf_bpe`, `spm_model` in tests/conftest.py): a byte-level BPE (`tokenizers`) whose vocabulary exceeds 65,535
ids (int32 .bin) and a SentencePiece model (`sentencepiece`, uint16 .bin).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gpt3d.data.indexed import MMapIndexedDataset
from gpt3d.commands.preprocess import main as preprocess_main
from gpt3d.data.preprocess import preprocess
from gpt3d.errors import TokenizerError
from gpt3d.tokenizers.factory import build_tokenizer, load_from_dir



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

    from gpt3d.tokenizers.files import export_tokenizer
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

    from gpt3d.tokenizers.files import export_tokenizer
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
    from gpt3d.tokenizers.files import data_sample, export_tokenizer
    from gpt3d.tokenizers.sentencepiece import GPTSentencePieceTokenizer
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

    from gpt3d.tokenizers.files import export_tokenizer
    spm.SentencePieceTrainer.train(sentence_iterator=iter([t for t in texts if t]), model_prefix=str(tmp_path / "w"),
                                   vocab_size=200, model_type="word", minloglevel=2)
    tok = build_tokenizer(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=str(tmp_path / "w.model"))
    with pytest.raises(TokenizerError, match="word/char.*cannot export"):
        export_tokenizer(tok, str(tmp_path), 128)


def test_tokenizer_for_checkpoint_prefers_the_carried_copy(spm_model, hf_bpe, tmp_path):
    from gpt3d.tokenizers.factory import tokenizer_for_checkpoint
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


# ----- fingerprints follow behaviour, not bytes (issue 26) ----------------------------------------------------------
def test_a_rewritten_tokenizer_has_the_fingerprint_of_the_original_files(hf_bpe, spm_model, tmp_path):
    """export-hf re-writes a tokenizer.json (other bytes, a new tokenizer_config.json) that encodes the same:
    the original files match a checkpoint that carries the re-written copy, and an older checkpoint's
    file-byte fingerprint; another tokenizer matches neither."""
    from gpt3d.tokenizers.files import export_tokenizer
    # the user's file as a hub would have it: compact JSON with a stored truncation (which gpt3d ignores)
    spec = json.loads(Path(hf_bpe, "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tokenizer.json").write_text(json.dumps(spec, separators=(",", ":")))
    tok = build_tokenizer(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "mine"))
    (tmp_path / "hf").mkdir()
    export_tokenizer(tok, str(tmp_path / "hf"), 32)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() != (tmp_path / "mine" / "tokenizer.json").read_bytes()
    rewritten = build_tokenizer(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "hf"))
    assert rewritten.file_fingerprint != tok.file_fingerprint          # the bytes differ ...
    assert rewritten.fingerprint == tok.fingerprint                    # ... what it does does not
    assert tok.matches(rewritten.manifest()) and rewritten.matches(tok.manifest())
    old = {**tok.manifest(), "fingerprint": tok.file_fingerprint}     # a checkpoint from before issue 26
    assert tok.matches(old) and not rewritten.matches(old)
    other = build_tokenizer(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=spm_model)
    assert not other.matches(tok.manifest()) and not other.matches(old) and not tok.matches(other.manifest())
    # an edit that changes what the tokenizer does (another eos) changes the fingerprint
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<s>"}))
    edited = build_tokenizer(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "hf"))
    assert edited.eod != tok.eod and not tok.matches(edited.manifest())


@pytest.mark.parametrize("kind", ["bpe", "spm", "llama2", "null"])
def test_decode_text_leaves_out_special_tokens_unless_kept(kind, hf_bpe, spm_model, texts):
    """generate's text: <s>, </s> (and Megatron's <EOD>, a SentencePiece bos) only with keep_special."""
    kw = {"bpe": dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf_bpe),
          "spm": dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=spm_model),
          "llama2": dict(tokenizer_type="Llama2Tokenizer", tokenizer_model=spm_model),
          "null": dict(tokenizer_type="NullTokenizer", vocab_size=50)}[kind]
    tok = build_tokenizer(**kw)
    text = "3 4 5" if kind == "null" else texts[1]
    ids = tok.encode(text) + [tok.eod]
    assert tok.special_ids() and tok.eod in tok.special_ids()
    plain, kept = tok.decode_text(ids), tok.decode_text(ids, keep_special=True)
    assert plain == tok.decode([i for i in ids if i not in tok.special_ids()])
    assert tok.eod_token in kept and tok.eod_token not in plain
    if tok.bos is not None and tok.bos in ids:                  # <s> put there by the tokenizer itself
        assert tok.decode_text([tok.bos]) == "" and tok.decode_text([tok.bos], keep_special=True).strip()
