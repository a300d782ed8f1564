"""Data is checked, not trusted (issue 24): a .bin/.idx is validated when it is opened, and the token-id check's
cache is keyed by the .bin's content.

Rows of docs/faults.md's "Faults tried": one `sizes` entry of a .idx bit-flipped trained 40 iterations on the next
documents' tokens (exit 0), a flip elsewhere crashed with a traceback; a same-size .bin rewritten with an
out-of-range id and its old mtime restored passed the cached check and crashed mid-run.
"""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt3d.tokenizers import vocab_check
from gpt3d.data.indexed import MMapIndexedDataset
from gpt3d.errors import DataError

from tests.support import hostile, runs
from tests.support.fuzz import fuzz
from tests.support.hostile import write_corpus

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

VOCAB = 300   # NullTokenizer ids 0..298 and its eod 299


def docs_of(n: int, seed: int = 0) -> list:
    return hostile.docs_of(n, VOCAB, seed)


def data_flags(prefix: str) -> list:
    return ["--no-mock-data", "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size",
            str(VOCAB - 1), "--split", "1,0,0", "--eval-iters", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, list]:
    """A 40-document corpus (uint16) and the tokens of each of its sequences."""
    prefix = str(tmp_path_factory.mktemp("corpus") / "c")
    write_corpus(prefix, docs_of(40))
    ds = MMapIndexedDataset(prefix)
    return prefix, [ds.get(i).copy() for i in range(len(ds))]


# The .idx regions as (offset, entry size, entries) for a corpus of n sequences and m doc_idx entries.
def _regions(n: int, m: int) -> dict:
    return {"header": (0, 1, 34), "sizes": (34, 4, n), "pointers": (34 + 4 * n, 8, n),
            "doc_idx": (34 + 12 * n, 8, m)}


@fuzz(300)
@given(damage=st.one_of(st.tuples(st.just("flip"), st.sampled_from(["header", "sizes", "pointers", "doc_idx"]),
                                  st.integers(0, 10 ** 6), st.integers(0, 7), st.integers(0, 7)),
                        st.tuples(st.sampled_from([".idx", ".bin"]), st.integers(1, 64))))
def test_a_corrupt_index_is_refused_naming_the_entry(corpus, tmp_path_factory, damage):
    """A bit flipped in any entry of the .idx (header, sizes, pointers, doc_idx; the first and last entries
    often), or either file truncated: the open is refused with a DataError naming the file (and, for an
    index entry, which one), or, where the flip left a consistent index (a document boundary moved), every
    sequence reads exactly as before and the documents still partition the sequences in order. (A flipped
    token in the .bin is the vocabulary check's: test_vocab_check.py.)"""
    prefix, sequences = corpus
    work = str(tmp_path_factory.mktemp("flip") / "c")
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as src, open(work + ext, "wb") as dst:
            dst.write(src.read())
    target = work + (".idx" if damage[0] == "flip" else damage[0])
    raw = bytearray(open(target, "rb").read())
    if damage[0] == "flip":
        _, region, entry, byte, bit = damage
        start, width, count = _regions(len(sequences), 41)[region]
        k = entry % count if entry < count or entry % 3 else count - 1   # the last entry often too
        raw[start + k * width + byte % width] ^= 1 << bit
    else:
        raw = raw[:max(0, len(raw) - damage[1])]
    open(target, "wb").write(raw)
    try:
        ds = MMapIndexedDataset(work)
    except DataError as e:
        assert str(e).startswith((work + ".idx:", work + ".bin:")), e
        return
    assert [ds.get(i).tolist() for i in range(len(ds))] == [s.tolist() for s in sequences]
    docs = ds.doc_idx.tolist()   # documents still partition the sequences, in order
    assert docs[0] == 0 and docs == sorted(docs) and docs[-1] == len(ds), docs


def test_a_flipped_size_is_one_error_line_naming_the_entry(corpus, tmp_path, capsys):
    """The docs/faults.md row: one sizes entry of a .idx bit-flipped. `gpt3d train` stops before training with one line
    naming the index and the first entry that disagrees; nothing existing is changed."""
    prefix, _ = corpus
    work = str(tmp_path / "c")
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as src, open(work + ext, "wb") as dst:
            dst.write(src.read())
    with open(work + ".idx", "r+b") as fh:   # sizes[5]: int32 at byte 34 + 4 * 5
        fh.seek(34 + 4 * 5)
        size = int.from_bytes(fh.read(4), "little")
        fh.seek(34 + 4 * 5)
        fh.write((size ^ 4).to_bytes(4, "little"))
    before = runs.snapshot(tmp_path)
    capsys.readouterr()
    assert runs.train(*data_flags(work), "--train-iters", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gpt3d: error: {work}.idx: pointers[6] is "), err
    assert runs.snapshot(tmp_path) == before


def test_the_token_id_cache_is_keyed_by_content(tmp_path, capsys, monkeypatch):
    """A .bin rewritten in place with the same size, one id beyond the vocabulary, and its old modification
    time restored: the cached range is not reused (its change time moved) and the run is refused with one
    line. The same content touched or copied keeps the cached range without re-reading the tokens."""
    prefix = str(tmp_path / "c")
    write_corpus(prefix, docs_of(40))
    assert runs.train(*data_flags(prefix), "--train-iters", "1") == 0
    ds = MMapIndexedDataset(prefix)
    calls = []
    real = vocab_check.id_range
    monkeypatch.setattr(vocab_check, "id_range", lambda *a: calls.append(a) or real(*a))
    os.utime(prefix + ".bin")                                      # touched: same content
    vocab_check.check_token_ids(ds, 0, len(ds), VOCAB)
    assert calls == []
    st_before = os.stat(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as fh:                     # same size, one id out of range
        fh.seek(10)
        fh.write(np.array([VOCAB + 7], np.uint16).tobytes())
    os.utime(prefix + ".bin", ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert os.stat(prefix + ".bin").st_size == st_before.st_size
    capsys.readouterr()
    assert runs.train(*data_flags(prefix), "--train-iters", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gpt3d: error: {prefix}.bin holds token id {VOCAB + 7}, outside the model's vocabulary of "
                   f"{VOCAB} ids (0-{VOCAB - 1}): tokenized with another tokenizer? (see --vocab-file, "
                   "--vocab-size)"], err


def test_index_checks_keep_legacy_files(tmp_path):
    """Megatron-DeepSpeed's --append-eod files (one eod per non-empty document in the .bin, not in the sizes)
    still open, with their warning; one byte more or less than that is refused."""
    prefix = str(tmp_path / "legacy")
    docs = docs_of(40)
    write_corpus(prefix, docs)
    with open(prefix + ".bin", "ab") as fh:
        fh.write(np.zeros(sum(1 for d in docs if len(d)), np.uint16).tobytes())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert len(MMapIndexedDataset(prefix)) == 37
    assert "leaves each document's eod token out of its sizes" in err.getvalue()
    with open(prefix + ".bin", "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(DataError, match=r"legacy.bin: size \d+ bytes does not match its index"):
        MMapIndexedDataset(prefix)


@fuzz(60)
@given(which=st.sampled_from(["doc", "sample", "shuffle", "blend", "blend_sample"]),
       cut=st.booleans(), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_cached_sample_indices_are_checked(corpus, tmp_path_factory, which, cut, where, bit):
    """The sample-index and blend caches beside the data, cut short or with a bit flipped: the rank that
    builds them rebuilds a cache that does not fit (wrong shape, an index or offset out of range) and every
    sample reads within the data; a rank that only reads them stops with a DataError naming the cache. A flip
    that stays in range is another order of whole samples, or a sample of the wrong length refused with a
    DataError naming the cache when it is read: never a crash, never a read outside the data."""
    from gpt3d.data.gpt_dataset import build_train_valid_test_datasets
    prefix, _ = corpus
    work = str(tmp_path_factory.mktemp("caches") / "c")
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as src, open(work + ext, "wb") as dst:
            dst.write(src.read())
    data_path = ["0.5", work, "0.5", work]

    def build(builder: bool = True):
        return build_train_valid_test_datasets(data_path, "1,0,0", (64, 0, 0), 16, 3, is_builder=builder)[0]

    blend = build()
    part = blend.datasets[0]
    path = {"blend": blend.cache_paths[0], "blend_sample": blend.cache_paths[1]}.get(which) or \
        part.cache_paths[which]
    raw = bytearray(open(path, "rb").read())
    at = int(where * len(raw))
    if cut:
        raw = raw[:at]
    else:
        raw[at] ^= 1 << bit
    open(path, "wb").write(raw)
    try:
        build(builder=False)
    except DataError as e:
        assert str(e).startswith(os.path.dirname(work)), e
    rebuilt = build()
    for i in range(len(rebuilt)):
        try:
            assert len(rebuilt[i]["text"]) == 17
        except DataError as e:   # a flip that stayed in range but moved a sample's end
            assert str(e).startswith(os.path.dirname(work)) and "cached sample index is corrupt" in str(e), e
