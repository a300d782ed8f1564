"""Sample order against Megatron-DeepSpeed's rules, re-implemented here as plain loops.

The reference below follows the algorithm as Megatron-DeepSpeed documents it
(megatron/data/gpt_dataset.py, helpers.cpp, dataset_utils.py, training.py):
epochs counted one at a time, the 80% separate-last-epoch rule, the sequential
sample walk with its one-token overlap, the two-part shuffle, and the greedy
blend over max(i, 1). gpt3d's vectorised builder must give the same arrays.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from gpt3d.data.blend import BlendableDataset, blending_indices
from gpt3d.data.gpt_dataset import (GPTDataset, build_index_mappings, build_train_valid_test_datasets,
                                    get_split_ranges, separate_last_epoch)
from gpt3d.data.indexed import MMapIndexedDataset, MMapIndexedDatasetBuilder
from gpt3d.data.sizing import train_iterations, train_valid_test_num_samples


# ----- reference: straightforward loops -------------------------------------------------------------------------
def ref_num_epochs(tokens_per_epoch, seq, num_samples):
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq >= num_samples:
            return epochs


def ref_doc_idx(documents, epochs, rng, separate):
    if separate and epochs > 1:
        return np.concatenate([ref_doc_idx(documents, epochs - 1, rng, False),
                               ref_doc_idx(documents, 1, rng, False)])
    arr = np.array([d for _ in range(epochs) for d in documents], dtype=np.int32)
    rng.shuffle(arr)
    return arr


def ref_sample_idx(sizes, doc_idx, seq, epochs, tokens_per_epoch):
    n = (epochs * tokens_per_epoch - 1) // seq
    rows = [(0, 0)]
    j, off = 0, 0
    while len(rows) <= n:
        remaining = seq + 1
        while remaining != 0:
            length = int(sizes[doc_idx[j]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - 1
                remaining = 0
            else:
                j += 1
                off = 0
        rows.append((j, off))
    return np.array(rows, dtype=np.int64)


def ref_shuffle(first, total, rng):
    head = np.arange(first, dtype=np.uint32)
    rng.shuffle(head)
    if first == total:
        return head
    tail = np.arange(first, total, dtype=np.uint32)
    rng.shuffle(tail)
    return np.concatenate([head, tail])


def ref_mappings(documents, sizes, num_samples, seq, seed):
    tokens = sum(int(sizes[d]) for d in documents)
    epochs = ref_num_epochs(tokens, seq, num_samples)
    rng = np.random.RandomState(seed)
    separate, before = False, 0
    if epochs > 1:
        before = ((epochs - 1) * tokens - 1) // seq
        per_epoch = (tokens - 1) // seq
        separate = (num_samples - before) < int(0.80 * per_epoch)
    doc_idx = ref_doc_idx(list(documents), epochs, rng, separate)
    sample_idx = ref_sample_idx(sizes, doc_idx, seq, epochs, tokens)
    total = len(sample_idx) - 1
    shuffle = ref_shuffle(before if separate else total, total, rng)
    return doc_idx, sample_idx, shuffle, epochs, separate


def ref_blend(weights, size):
    counts = [0] * len(weights)
    d_idx, s_idx = [], []
    for i in range(size):
        t = float(max(i, 1))
        errors = [w * t - c for w, c in zip(weights, counts)]
        best = 0
        for d in range(1, len(weights)):
            if errors[d] > errors[best]:
                best = d
        d_idx.append(best)
        s_idx.append(counts[best])
        counts[best] += 1
    return np.array(d_idx), np.array(s_idx)


def ref_normalize(weights):
    total = 0.0
    for w in weights:
        total += w
    return [w / total for w in weights]


# ----- fixtures -------------------------------------------------------------------------------------------------
SEQ = 16


def _sizes(seed, n=120):
    """Document lengths around the sequence length, with empty documents and exact multiples of it."""
    rng = np.random.RandomState(seed)
    sizes = rng.randint(0, 3 * SEQ, size=n).astype(np.int32)
    sizes[::17] = 0
    sizes[3::11] = SEQ
    sizes[5::13] = SEQ + 1
    return sizes


def _write_corpus(prefix, sizes, base):
    """Token j of document d is (base + 7 * d + j) % 50000, so every sample's origin is recognisable."""
    b = MMapIndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for d, n in enumerate(sizes):
        b.add_item((base + 7 * d + np.arange(n)) % 50000)
        b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


def _stream_sample(indexed, doc_idx, k, seq):
    """Sample k by definition: tokens k*seq .. (k+1)*seq of the doc_idx stream."""
    stream = np.concatenate([np.asarray(indexed[int(d)]) for d in doc_idx])
    return stream[k * seq:(k + 1) * seq + 1]


# ----- tests ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epochs_wanted,separate", [(0.5, False), (1.0, False), (2.3, True), (2.9, False)])
def test_index_mappings_equal_the_sequential_rules(epochs_wanted, separate):
    sizes = _sizes(1)
    documents = np.arange(7, 107, dtype=np.int32)          # a split that does not start at document 0
    tokens = int(sizes[documents].sum())
    num_samples = int(epochs_wanted * ((tokens - 1) // SEQ))
    doc, sample, shuffle, epochs, sep = ref_mappings(documents, sizes, num_samples, SEQ, seed=1234)
    assert sep is separate and epochs == math.ceil(epochs_wanted)
    got = build_index_mappings(documents, sizes, num_samples, SEQ, 1234)
    assert got["doc"].dtype == np.int32 and np.array_equal(got["doc"], doc)
    assert np.array_equal(got["sample"], sample)
    assert got["shuffle"].dtype == np.uint32 and np.array_equal(got["shuffle"], shuffle)
    assert separate_last_epoch(tokens, SEQ, num_samples, epochs)[0] is separate


def test_empty_documents_and_exact_fits_follow_the_walk():
    """Empty documents are stepped over and a document that ends exactly at a sample end keeps its last
    token for the next sample, as the sequential walk does; so does an empty first document (row 0)."""
    sizes = np.array([0, SEQ + 1, 0, 0, SEQ, 1, SEQ, 0, 2 * SEQ, 3, 0, 5 * SEQ + 1], dtype=np.int32)
    documents = np.arange(len(sizes), dtype=np.int32)
    for seed in range(20):
        doc, sample, shuffle, _, _ = ref_mappings(documents, sizes, 25, SEQ, seed)
        got = build_index_mappings(documents, sizes, 25, SEQ, seed)
        assert np.array_equal(got["doc"], doc) and np.array_equal(got["sample"], sample), seed
        assert np.array_equal(got["shuffle"], shuffle)


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.2, 0.5, 0.3], [1, 1, 1], [0.1] * 10, [0.999, 0.001],
                                     [5, 3, 2, 7]])
def test_blending_is_megatrons_greedy(weights):
    w = np.array(ref_normalize(weights), dtype=np.float64)
    w /= np.sum(w)
    ref_d, ref_s = ref_blend(list(w), 4000)
    got_d, got_s = blending_indices(w, 4000)
    assert got_d.dtype == np.uint8 and np.array_equal(got_d, ref_d) and np.array_equal(got_s, ref_s)


def test_three_corpus_blend_sample_for_sample(tmp_path):
    """Corpus sizes ceil(N * w * 1.005), each corpus's own indices, the greedy blend, the tokens served."""
    prefixes = [_write_corpus(str(tmp_path / f"c{i}"), _sizes(10 + i, n=60 + 20 * i), 1000 * i) for i in range(3)]
    raw = [2.0, 5.0, 3.0]
    data_path = [x for w, p in zip(raw, prefixes) for x in (str(w), p)]
    n = (300, 40, 10)
    split = "80,12,8"
    train, valid, test = build_train_valid_test_datasets(data_path, split, n, SEQ, 77)
    weights = ref_normalize(raw)
    # Megatron-DeepSpeed sizes each blend by the sum of the per-corpus counts, not by N
    sizes = [sum(int(math.ceil(m * w * 1.005)) for w in weights) for m in n]
    ref_d, ref_s = ref_blend(list(np.array(weights) / np.sum(weights)), sizes[0])
    assert len(train) == sizes[0] == 303 > n[0]
    assert np.array_equal(train.dataset_index, ref_d) and np.array_equal(train.sample_index, ref_s)
    for c, (prefix, w) in enumerate(zip(prefixes, weights)):
        indexed = MMapIndexedDataset(prefix)
        lo, hi = get_split_ranges(split, len(indexed))[0]
        wanted = int(math.ceil(n[0] * w * 1.005))
        doc, sample, shuffle, _, _ = ref_mappings(np.arange(lo, hi), indexed.sizes, wanted, SEQ, 77)
        member = train.datasets[c]
        assert np.array_equal(member.doc_idx, doc) and np.array_equal(member.sample_idx, sample)
        assert np.array_equal(member.shuffle_idx, shuffle)
        for i in np.flatnonzero(ref_d == c)[:25]:
            k = int(shuffle[ref_s[i]])
            assert np.array_equal(train[int(i)]["text"], _stream_sample(indexed, doc, k, SEQ)), i
    for blend, size in ((valid, sizes[1]), (test, sizes[2])):
        ref_d, ref_s = ref_blend(list(np.array(weights) / np.sum(weights)), size)
        assert len(blend) == size and np.array_equal(blend.dataset_index, ref_d)
        assert np.array_equal(blend.sample_index, ref_s)
    # the blend is cached beside the first corpus and read back by a non-building rank
    again = build_train_valid_test_datasets(data_path, split, n, SEQ, 77, is_builder=False)[0]
    assert isinstance(again.dataset_index, np.memmap)
    assert np.array_equal(again.dataset_index, train.dataset_index)
    assert np.array_equal(again.sample_index, train.sample_index)


def test_one_weighted_corpus_takes_the_blend_path(tmp_path):
    """Megatron branches on the raw --data-path list: `1.0 prefix` (two items) is a blend of one corpus, asked
    for ceil(N * 1.005) samples. With N exactly one epoch that needs a second epoch, so the order differs
    from the plain `prefix` one, whose index has one epoch."""
    prefix = _write_corpus(str(tmp_path / "w"), _sizes(4, n=90), 0)
    indexed = MMapIndexedDataset(prefix)
    docs = np.arange(len(indexed), dtype=np.int32)
    n = (int(indexed.sizes.sum()) - 1) // SEQ                # one epoch's samples
    wanted = int(math.ceil(n * 1.0 * 1.005))
    plain = build_train_valid_test_datasets([prefix], "1", (n, 0, 0), SEQ, 9)[0]
    doc, _, shuffle, epochs, _ = ref_mappings(docs, indexed.sizes, n, SEQ, 9)
    assert isinstance(plain, GPTDataset) and epochs == 1 and np.array_equal(plain.shuffle_idx, shuffle)
    for data_path in (["1.0", prefix], ["0.25", prefix], f"1 {prefix}"):
        blend = build_train_valid_test_datasets(data_path, "1", (n, 0, 0), SEQ, 9)[0]
        assert isinstance(blend, BlendableDataset) and len(blend) == wanted > n
        doc, sample, shuffle, epochs, _ = ref_mappings(docs, indexed.sizes, wanted, SEQ, 9)
        assert epochs == 2 and blend.order == "2 epochs, the last shuffled apart"
        (member,) = blend.datasets
        assert np.array_equal(member.doc_idx, doc) and np.array_equal(member.sample_idx, sample)
        assert np.array_equal(member.shuffle_idx, shuffle)
        assert not blend.dataset_index.any() and np.array_equal(blend.sample_index, np.arange(wanted))
        for i in range(0, n, 5):
            assert np.array_equal(blend[i]["text"], _stream_sample(indexed, doc, int(shuffle[i]), SEQ)), i
    assert not np.array_equal(plain.shuffle_idx[:n], member.shuffle_idx[:n])


def test_reads_megatron_deepspeed_append_eod_files_as_megatron_does(tmp_path, capsys):
    """Megatron-DeepSpeed's preprocess_data.py at the seed's commit, with --append-eod, writes each non-empty
    document's eod into the .bin but not into the .idx sizes; Megatron reads through the pointers regardless.
    gpt3d opens such a pair (the .bin longer by exactly one token per non-empty document) and reads the same
    tokens; any other size mismatch is still refused."""
    from gpt3d.errors import DataError
    eod = 50000
    docs = [[1, 2, 3], [], [4, 5], [6] * 20, [], [7, 8, 9, 10]]
    prefix = str(tmp_path / "mds")
    b = MMapIndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for d in docs:                                           # sizes without the eod, as that script counts
        if d:
            b.add_item(d)
        b.end_document()
    b.finalize(prefix + ".idx")
    flat = np.array([t for d in docs if d for t in d + [eod]], dtype=np.uint16)
    flat.tofile(prefix + ".bin")                             # the eods are in the .bin
    ds = MMapIndexedDataset(prefix)
    assert "leaves each document's eod token out of its sizes" in capsys.readouterr().err
    starts = np.concatenate([[0], np.cumsum(ds.sizes)[:-1]])   # Megatron: pointers from the sizes alone
    for i, (start, size) in enumerate(zip(starts, ds.sizes)):
        assert np.array_equal(ds[i], flat[start:start + size]), i
    assert list(ds[1]) == [eod, 4]                           # the first eod shifts every later sequence
    np.append(flat, [eod]).astype(np.uint16).tofile(prefix + ".bin")   # one token too many: not that layout
    with pytest.raises(DataError, match="does not match its index"):
        MMapIndexedDataset(prefix)


def test_dataset_serves_the_stream_in_shuffle_order(tmp_path):
    prefix = _write_corpus(str(tmp_path / "one"), _sizes(3, n=80), 0)
    indexed = MMapIndexedDataset(prefix)
    docs = np.arange(0, 70, dtype=np.int32)
    ds = GPTDataset("train", prefix, indexed, docs, 150, SEQ, 5, cache=False)
    doc, _, shuffle, _, _ = ref_mappings(docs, indexed.sizes, 150, SEQ, 5)
    assert len(ds) == len(shuffle) >= 150                     # every sample of the epochs built, like Megatron
    for i in range(0, len(ds), 7):
        assert np.array_equal(ds[i]["text"], _stream_sample(indexed, doc, int(shuffle[i]), SEQ)), i


def test_sample_counts_as_megatron_deepspeed_sizes_them():
    # the seed's 125M script: --train-samples 292968750, global batch 256, eval every 100 for 10 batches
    iters = train_iterations(None, 292_968_750, 300_000_000_000, 256, 2048)
    assert iters == 1_144_409
    assert train_valid_test_num_samples(iters, 292_968_750, 256, 100, 10) == (292_968_750, 29_299_200, 2_560)
    # 1.3B / 13B scripts: global batch 512 and 1024
    assert train_valid_test_num_samples(train_iterations(None, 292_968_750, None, 512, 2048), 292_968_750,
                                        512, 100, 10) == (292_968_750, 29_301_760, 5_120)
    assert train_valid_test_num_samples(train_iterations(None, 292_968_750, None, 1024, 2048), 292_968_750,
                                        1024, 100, 10) == (292_968_750, 29_306_880, 10_240)
    # iteration-based: train_iters * global batch
    assert train_valid_test_num_samples(2000, None, 16, 500, 4) == (32_000, 320, 64)
    assert train_iterations(None, None, 1_000_000, 8, 64) == 1954


def test_blend_corpus_sizes_use_the_1005_margin(tmp_path):
    prefixes = [_write_corpus(str(tmp_path / f"m{i}"), _sizes(20 + i, n=50), 0) for i in range(3)]
    raw = [0.1, 0.2, 0.3]                       # sums to 0.6000000000000001 left to right
    train = build_train_valid_test_datasets([x for w, p in zip(raw, prefixes) for x in (str(w), p)],
                                            "1", (997, 0, 0), SEQ, 3)[0]
    for member, w in zip(train.datasets, ref_normalize(raw)):
        wanted = int(math.ceil(997 * w * 1.005))
        assert f"_{wanted}ns_" in member.cache_paths["doc"]


def test_blending_cache_is_keyed_by_weights(tmp_path):
    a, b = (BlendableDataset([range(500), range(500)], w, 500, cache_prefix=str(tmp_path / f"bl{i}"))
            for i, w in enumerate(([0.3, 0.7], [0.7, 0.3])))
    assert not np.array_equal(a.dataset_index, b.dataset_index)
    prefixes = [_write_corpus(str(tmp_path / f"k{i}"), _sizes(30 + i, n=50), 0) for i in range(2)]
    one = build_train_valid_test_datasets(["0.3", prefixes[0], "0.7", prefixes[1]], "1", (200, 0, 0), SEQ, 1)[0]
    two = build_train_valid_test_datasets(["0.7", prefixes[0], "0.3", prefixes[1]], "1", (200, 0, 0), SEQ, 1)[0]
    assert one.cache_paths != two.cache_paths
    assert len(one) == len(two) == 61 + 141                  # ceil(200 * 0.3 * 1.005) + ceil(200 * 0.7 * 1.005)
    for blend, w in ((one, [0.3, 0.7]), (two, [0.7, 0.3])):
        assert np.array_equal(blend.dataset_index, ref_blend(ref_normalize(w), len(blend))[0])
