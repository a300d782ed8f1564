"""Fixtures every test builds for itself: text, a GPT-2-style BPE trained on it, and its .bin/.idx (per session);
made-up-word documents and the user tokenizers trained on them (per module).

Nothing outside the repository is read (a fresh clone has no GPT-2 files or corpora beside it);
tests/support/textgen.py explains the generated text and tokenizers.
"""
import json
import os
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.support.textgen import (english_like_text, make_texts, paragraphs, train_gpt2_style_bpe, train_hf_bpe,
                                   train_sentencepiece)

CORPUS_CHARS = 1_000_000


@pytest.fixture(scope="session", autouse=True)
def runs_root(tmp_path_factory):
    """Run directories (gpt3d/train/rundir.py) of every training run the tests make, in-process or spawned,
    go under one temporary directory instead of runs/ in the repository."""
    root = tmp_path_factory.mktemp("runs")
    old = os.environ.get("GPT3D_RUNS_DIR")
    os.environ["GPT3D_RUNS_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("GPT3D_RUNS_DIR", None)
    else:
        os.environ["GPT3D_RUNS_DIR"] = old


class BPEFiles(NamedTuple):
    vocab: Path     # vocab.json, GPT-2 layout: byte-level tokens -> ids, <|endoftext|> last
    merges: Path    # merges.txt with GPT-2's '#version' header


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """About 1 MB of seeded English-like play text (speeches, sentences, topic words)."""
    return english_like_text(CORPUS_CHARS, seed=0)


@pytest.fixture(scope="session")
def heldout_text() -> str:
    """Text from the same grammar with another seed: not in the training corpus."""
    return english_like_text(6000, seed=1)


@pytest.fixture(scope="session")
def bpe(corpus_text, tmp_path_factory) -> BPEFiles:
    """A byte-level BPE (~1.7k tokens) trained on the corpus with HF `tokenizers`, saved like GPT-2's files."""
    return BPEFiles(*train_gpt2_style_bpe(corpus_text, tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="session")
def text_jsonl(corpus_text, tmp_path_factory) -> Path:
    """The corpus as JSONL, one speech per document."""
    out = tmp_path_factory.mktemp("text") / "text.jsonl"
    out.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs(corpus_text)))
    return out


@pytest.fixture(scope="session")
def text_prefix(text_jsonl, bpe, tmp_path_factory) -> str:
    """The corpus tokenized by `preprocess` into Megatron's .bin/.idx (with end-of-document tokens)."""
    from gpt3d.data.preprocess import preprocess
    prefix = str(tmp_path_factory.mktemp("textbin") / "text")
    preprocess(str(text_jsonl), prefix, str(bpe.vocab), str(bpe.merges), ["text"], append_eod=True, workers=1,
               progress=False)
    return prefix + "_text_document"


# ----- the tokenizers a user brings (unit/test_tokenizers.py, unit/test_preprocess.py,
#       end_to_end/test_llama_pretraining.py)
@pytest.fixture(scope="module")
def texts() -> list:
    """400 documents of made-up words (a few empty)."""
    return make_texts(400)


@pytest.fixture(scope="module")
def hf_bpe(tmp_path_factory, texts) -> str:
    """Directory of a tokenizer.json: byte-level BPE trained on `texts`, 66,000 ids, <s> prepended."""
    return train_hf_bpe(texts, tmp_path_factory.mktemp("hf_bpe"))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, texts) -> str:
    """Path of a 300-piece SentencePiece model trained on `texts`."""
    return train_sentencepiece(texts, tmp_path_factory.mktemp("spm"))
