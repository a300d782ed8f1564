import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB, MERGES = SHARED / "gpt2-vocab.json", SHARED / "gpt2-merges.txt"


@pytest.fixture(scope="session")
def shakespeare_jsonl(tmp_path_factory) -> Path:
    """tinyshakespeare as JSONL, one paragraph per document (real English text)."""
    out = tmp_path_factory.mktemp("ts") / "ts.jsonl"
    paras = [p for p in (SHARED / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()]
    out.write_text("".join(json.dumps({"text": p + "\n\n"}) + "\n" for p in paras))
    return out


@pytest.fixture(scope="session")
def shakespeare_prefix(shakespeare_jsonl, tmp_path_factory) -> str:
    from gpt3d.data.preprocess import preprocess
    prefix = str(tmp_path_factory.mktemp("tsbin") / "ts")
    preprocess(str(shakespeare_jsonl), prefix, str(VOCAB), str(MERGES), ["text"], append_eod=True, workers=1,
               progress=False)
    return prefix + "_text_document"
