"""Megatron-format data: .bin/.idx byte compatibility, tokenizer, preprocess, dataset indices, sampler."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from gpt3d.data.blend import BlendableDataset
from gpt3d.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets, get_split_ranges
from gpt3d.data.indexed import MMapIndexedDataset, MMapIndexedDatasetBuilder, best_dtype
from gpt3d.errors import DataError
from gpt3d.commands.preprocess import main as preprocess_main
from gpt3d.data.sampler import MockGPTDataset, PretrainingSampler
from gpt3d.tokenizers.base import GPT2BPETokenizer
from gpt3d.errors import TokenizerError

from tests.support.textgen import paragraphs

# An independent MMIDIDX writer/reader, written from the format description, not from gpt3d's code.
def ref_write(prefix, docs, code, np_dtype):
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.array(d, dtype=np_dtype).tobytes())
    sizes = [len(d) for d in docs]
    ptrs, off = [], 0
    for s in sizes:
        ptrs.append(off)
        off += s * np.dtype(np_dtype).itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(docs) + 1))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(ptrs)}q", *ptrs))
        f.write(struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1)))


def ref_read(prefix):
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, m = struct.unpack("<QBQQ", raw[9:34])
    sizes = struct.unpack(f"<{n}i", raw[34:34 + 4 * n])
    ptrs = struct.unpack(f"<{n}q", raw[34 + 4 * n:34 + 12 * n])
    doc_idx = struct.unpack(f"<{m}q", raw[34 + 12 * n:34 + 12 * n + 8 * m])
    dt = {8: np.uint16, 4: np.int32}[code]
    data = np.fromfile(prefix + ".bin", dtype=dt)
    docs = [data[p // np.dtype(dt).itemsize:p // np.dtype(dt).itemsize + s].tolist() for p, s in zip(ptrs, sizes)]
    return version, code, docs, list(doc_idx)


DOCS = [[1, 2, 3], [60000, 5], [7] * 10, [0]]


@pytest.mark.parametrize("vocab,code", [(50257, 8), (100000, 4)])
def test_idx_round_trip_both_directions(tmp_path, vocab, code):
    dtype = best_dtype(vocab)
    b = MMapIndexedDatasetBuilder(str(tmp_path / "ours.bin"), dtype)
    for d in DOCS:
        b.add_item(d)
        b.end_document()
    b.finalize(str(tmp_path / "ours.idx"))
    version, got_code, docs, doc_idx = ref_read(str(tmp_path / "ours"))
    assert (version, got_code, docs, doc_idx) == (1, code, DOCS, [0, 1, 2, 3, 4])
    ref_write(str(tmp_path / "theirs"), DOCS, code, dtype)
    ds = MMapIndexedDataset(str(tmp_path / "theirs"))
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS
    assert ds.sizes.tolist() == [3, 2, 10, 1] and ds.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert ds.get(2, offset=3, length=4).tolist() == [7] * 4
    assert open(tmp_path / "ours.idx", "rb").read() == open(tmp_path / "theirs.idx", "rb").read()


def test_idx_errors_name_the_file(tmp_path):
    ref_write(str(tmp_path / "a"), DOCS, 8, np.uint16)
    os.remove(tmp_path / "a.bin")
    with pytest.raises(DataError, match="a.bin.*not found"):
        MMapIndexedDataset(str(tmp_path / "a"))
    ref_write(str(tmp_path / "b"), DOCS, 8, np.uint16)
    with open(tmp_path / "b.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="b.bin: size 10 bytes does not match"):
        MMapIndexedDataset(str(tmp_path / "b"))
    (tmp_path / "c.idx").write_bytes(b"NOTMAGIC" + bytes(40))
    (tmp_path / "c.bin").write_bytes(b"")
    with pytest.raises(DataError, match="c.idx: not a Megatron"):
        MMapIndexedDataset(str(tmp_path / "c"))


# Text the trained vocabulary never saw: wikitext-style markup, digits, contractions, runs of spaces, accents,
# CJK, emoji, tabs; byte-level BPE must split it exactly like GPT-2's reference tokenizer does.
UNSEEN = [" = Valkyria Chronicles III = ", "The game 's 2011 release sold 1 @,@ 200 @,@ 000 copies ( 45 % ) .",
          "I'm sure you've heard: it's theirs, we'll see, they'd said -- don't!", "   leading and trailing   ",
          "tabs\tand\r\nwindows line ends", "naïve café, Zürich — “quotes” and ‘single’ ones…",
          "東京タワーは高い。", "emoji 🚀🔥 and mixed 3.14159e-10 x²", "UPPER lower MiXeD 12ab34 __init__ a_b",
          "", " ", "\n\n\n"]


def test_tokenizer_matches_gpt2_reference(bpe, corpus_text):
    """Our GPT2BPETokenizer and transformers' GPT2Tokenizer on the same GPT-2-style vocab.json/merges.txt."""
    from transformers import GPT2Tokenizer
    ours = GPT2BPETokenizer(str(bpe.vocab), str(bpe.merges))
    ref = GPT2Tokenizer(str(bpe.vocab), str(bpe.merges))
    lines = corpus_text.split("\n")[:300] + UNSEEN
    for line in lines:
        assert ours.tokenize(line) == ref.encode(line), line
        assert ours.detokenize(ours.tokenize(line)) == line
    vocab = json.loads(bpe.vocab.read_text(encoding="utf-8"))
    assert ours.vocab_size == len(vocab) > 1000 and ours.eod == vocab["<|endoftext|>"] == len(vocab) - 1
    assert len(ours.tokenize(corpus_text[:20000])) < 20000 / 3.5   # merges learned the words


def test_tokenizer_errors(tmp_path, bpe):
    with pytest.raises(TokenizerError, match="vocab file not found"):
        GPT2BPETokenizer(str(tmp_path / "nope.json"), str(bpe.merges))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json: corrupt vocab"):
        GPT2BPETokenizer(str(tmp_path / "bad.json"), str(bpe.merges))


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_preprocess_workers_eod_and_empty(tmp_path, bpe, corpus_text):
    texts = paragraphs(corpus_text)[:300] + [""]
    _jsonl(tmp_path / "in.jsonl", texts)
    args = ["--input", str(tmp_path / "in.jsonl"), "--vocab-file", str(bpe.vocab), "--merge-file", str(bpe.merges)]
    assert preprocess_main(args + ["--output-prefix", str(tmp_path / "w1"), "--workers", "1"]) == 0
    assert preprocess_main(args + ["--output-prefix", str(tmp_path / "w2"), "--workers", "2", "--append-eod"]) == 0
    one, two = MMapIndexedDataset(str(tmp_path / "w1_text_document")), \
        MMapIndexedDataset(str(tmp_path / "w2_text_document"))
    tok = GPT2BPETokenizer(str(bpe.vocab), str(bpe.merges))
    expect = [tok.tokenize(t) for t in texts if t]
    assert len(one) == len(two) == len(expect) == 300          # the empty document was skipped
    for i, e in enumerate(expect):
        assert one[i].tolist() == e
        assert two[i].tolist() == e + [tok.eod]
    assert one.dtype == np.uint16


def test_preprocess_malformed_json_keeps_existing_output(tmp_path, capsys, bpe):
    _jsonl(tmp_path / "good.jsonl", ["hello world", "second doc"])
    base = ["--vocab-file", str(bpe.vocab), "--merge-file", str(bpe.merges), "--output-prefix", str(tmp_path / "out")]
    assert preprocess_main(["--input", str(tmp_path / "good.jsonl")] + base) == 0
    before = {e: (tmp_path / f"out_text_document{e}").read_bytes() for e in (".bin", ".idx")}
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok2"}\n{"text": broken\n')
    assert preprocess_main(["--input", str(tmp_path / "bad.jsonl")] + base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpt3d: error: ") and f"{tmp_path / 'bad.jsonl'}:3: malformed JSON" in err[-1]
    for e, data in before.items():
        assert (tmp_path / f"out_text_document{e}").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []


def test_split_ranges_follow_megatron():
    assert get_split_ranges("949,50,1", 1000) == [(0, 949), (949, 999), (999, 1000)]
    assert get_split_ranges("98,2,0", 100) == [(0, 98), (98, 100), (100, 100)]
    assert get_split_ranges("1", 10) == [(0, 10), (10, 10), (10, 10)]


def test_dataset_samples_overlap_and_are_deterministic(text_prefix, tmp_path):
    ds_args = dict(seq_length=32, seed=5)
    idx = MMapIndexedDataset(text_prefix)
    docs = np.arange(0, 1000)
    a = GPTDataset("train", text_prefix, idx, docs, 200, cache=False, **ds_args)
    b = GPTDataset("train", text_prefix, idx, docs, 200, cache=False, **ds_args)
    c = GPTDataset("train", text_prefix, idx, docs, 200, cache=False, seq_length=32, seed=6)
    assert all(len(a[i]["text"]) == 33 for i in range(200))
    assert all((a[i]["text"] == b[i]["text"]).all() for i in range(200))
    assert any((a[i]["text"] != c[i]["text"]).any() for i in range(200))
    # un-shuffled, consecutive samples share one token; their concatenation is the document stream
    stream = np.concatenate([idx[int(d)] for d in a.doc_idx[:50]])
    order = np.argsort(a.shuffle_idx)
    first, second = a[int(order[0])]["text"], a[int(order[1])]["text"]
    assert (first == stream[:33]).all() and (second == stream[32:65]).all()


def test_dataset_cache_built_once(text_prefix):
    calls = []
    ds = build_train_valid_test_datasets([text_prefix], "90,10,0", (64, 16, 0), 32, 11,
                                         barrier=lambda: calls.append(1))
    paths = ds[0].cache_paths
    mtimes = {k: os.path.getmtime(p) for k, p in paths.items()}
    again = build_train_valid_test_datasets([text_prefix], "90,10,0", (64, 16, 0), 32, 11,
                                            is_builder=False, barrier=lambda: calls.append(1))
    assert {k: os.path.getmtime(p) for k, p in paths.items()} == mtimes
    assert isinstance(again[0].shuffle_idx, np.memmap)
    assert all((ds[0][i]["text"] == again[0][i]["text"]).all() for i in range(64))
    assert ds[2] is None and len(calls) == 4


def test_dataset_cache_follows_the_split(text_prefix):
    """A new --split with the same sample counts must not reuse the old split's cached indices."""
    n_docs = len(MMapIndexedDataset(text_prefix))
    wide = build_train_valid_test_datasets([text_prefix], "95,5,0", (64, 16, 0), 32, 13)[0]
    narrow = build_train_valid_test_datasets([text_prefix], "50,50,0", (64, 16, 0), 32, 13)[0]
    hi = get_split_ranges("50,50,0", n_docs)[0][1]
    assert wide.cache_paths != narrow.cache_paths
    assert int(np.max(narrow.doc_idx)) < hi <= int(np.max(wide.doc_idx))


def test_data_too_small(text_prefix):
    idx = MMapIndexedDataset(text_prefix)
    with pytest.raises(DataError, match="data too small for seq length 4096"):
        GPTDataset("train", text_prefix, idx, np.arange(0, 2), 10, 4096, 1, cache=False)


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.2, 0.5, 0.3], [0.1] * 10, [1.0]])
def test_blending_is_the_greedy_rule(weights):
    """Sample i goes to argmax_d(w_d * max(i, 1) - count_d) (Megatron's helpers.cpp), first index on ties."""
    from gpt3d.data.blend import blending_indices
    w = np.asarray(weights) / sum(weights)
    got_d, got_s = blending_indices(w, 3000)
    counts = np.zeros(len(w), dtype=np.int64)
    for i in range(3000):
        d = int(np.argmax(w * max(i, 1) - counts))
        assert (got_d[i], got_s[i]) == (d, counts[d]), i
        counts[d] += 1


def test_blending_follows_weights():
    a, b = MockGPTDataset(5000, 8, 100, 1), MockGPTDataset(5000, 8, 100, 2)
    blend = BlendableDataset([a, b], [0.3, 0.7], 2000)
    share = np.bincount(blend.dataset_index, minlength=2) / 2000
    assert abs(share[0] - 0.3) < 0.01 and abs(share[1] - 0.7) < 0.01
    assert (blend[0]["text"] == [a, b][blend.dataset_index[0]][0]["text"]).all()


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_sampler_global_batch_is_layout_independent(dp):
    mbs, gbs = 2, 8
    ref = list(PretrainingSampler(64, 0, gbs, 0, 1))   # one process, micro batch = global batch
    ranks = [list(PretrainingSampler(64, 0, mbs, r, dp)) for r in range(dp)]
    per_step = gbs // (mbs * dp)
    for it, batch in enumerate(ref):
        got = sorted(i for r in ranks for mb in r[it * per_step:(it + 1) * per_step] for i in mb)
        assert got == sorted(batch)
    for r in range(dp):   # resume at iteration 3 continues the unbroken run
        resumed = list(PretrainingSampler(64, 3 * gbs, mbs, r, dp))
        assert resumed == ranks[r][3 * per_step:]


def test_mock_dataset_deterministic():
    a, b = MockGPTDataset(10, 16, 512, 3), MockGPTDataset(10, 16, 512, 3)
    assert all((a[i]["text"] == b[i]["text"]).all() for i in range(10))
