"""Data whose ids do not fit the model's vocabulary is refused before training (row: int32 data with ids
beyond the vocabulary ended in a 66-line IndexError from the embedding)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpt3d.tokenizers import vocab_check
from gpt3d.data.indexed import MMapIndexedDataset, MMapIndexedDatasetBuilder

from tests.support import runs

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def _write(prefix: str, docs: list, dtype=np.int32) -> MMapIndexedDataset:
    b = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_item(d)
        b.end_document()
    b.finalize(prefix + ".idx")
    return MMapIndexedDataset(prefix)


def _docs(n: int, high: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(20, 60))) for _ in range(n)]


def test_int32_ids_beyond_the_vocabulary_are_one_error_line(tmp_path, capsys, bpe):
    docs = _docs(200, 1000)
    docs[150][3] = 70_000   # a bigger tokenizer's id, in the train split's documents
    _write(str(tmp_path / "big"), docs)
    capsys.readouterr()
    rc = runs.train("--no-mock-data", "--data-path", str(tmp_path / "big"), "--vocab-file", str(bpe.vocab),
                "--merge-file", str(bpe.merges), "--vocab-size", "2048", "--split", "1,0,0", "--train-iters", "2",
                "--save", str(tmp_path / "ck"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"gpt3d: error: {tmp_path / 'big'}.bin holds token id 70000, outside the model's vocabulary "
                      "of 2048 ids (0-2047): tokenized with another tokenizer? (see --vocab-file, --vocab-size)")
    assert not (tmp_path / "ck" / "latest").exists()


def test_id_range_over_blocks_and_its_cache(tmp_path, monkeypatch):
    docs = _docs(50, 300, seed=1)
    docs[7][0], docs[40][5] = -2, 299
    ds = _write(str(tmp_path / "d"), docs)
    monkeypatch.setattr(vocab_check, "_BLOCK", 17)   # many blocks, boundaries inside documents
    assert vocab_check.id_range(ds, 0, 50) == (-2, 299)
    assert vocab_check.id_range(ds, 8, 40) == (min(int(d.min()) for d in docs[8:40]),
                                               max(int(d.max()) for d in docs[8:40]))
    with pytest.raises(Exception, match="holds token id -2"):
        vocab_check.check_token_ids(ds, 0, 50, 300)
    vocab_check.check_token_ids(ds, 8, 40, 300)   # the documents in use are fine
    cache = tmp_path / "d_token_ids_8-40.json"
    assert json.loads(cache.read_text())["span"][:2] == [8, 40]
    monkeypatch.setattr(vocab_check, "id_range", lambda *a: pytest.fail("the cached range was not used"))
    vocab_check.check_token_ids(ds, 8, 40, 300)
