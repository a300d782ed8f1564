"""What makes two tokenizers the same tokenizer: what they do, not the bytes of their files.

A checkpoint records its tokenizer's fingerprint and a resume with another tokenizer is refused (every embedding
row would mean another token). Hashing the files' bytes refused the same tokenizer re-written (export-hf's
tokenizer.json, which import-hf carries: other bytes, the same ids) and accepted nothing else either. The
fingerprint hashes `behaviour(tok)`: the type-independent settings, the vocabulary (token -> id), BPE merges or
unigram scores, the special ids, eod and bos, and the ids the tokenizer gives PROBES, texts chosen to exercise
whitespace, Unicode, special-token look-alikes, code and prose. PROBES are also what export-hf checks its
tokenizer.json against (tokenizers/files.py).
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

from ..errors import TokenizerError

# Texts whose ids make a tokenizer's fingerprint, and that export-hf's tokenizer.json must encode as gpt3d does:
# whitespace, Unicode, emoji, special-token look-alikes, code, numbers and ordinary prose.
PROBES = [
    "Hello world", "  two leading spaces", "trailing space ", "a  b   c", "tab\tnew\nline\r\n", "", " ",
    "UPPER lower 12345 3.14 -7", "naïve café Ünïcode 東京 мир ﬁ Ａ", "emoji 🙂👍🏽", "<s> </s> <unk> <pad> <eos>",
    "<|endoftext|> <|end_of_text|> <EOD><EOD> <CLS>x<SEP>", "\u2581already \u2581\u2581", "x" * 300,
    "def f(x):\n    return x  # code\n", "<0x41> <0xFF>", "\u00a0nbsp\u3000ideographic\u200bzw",
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times; "
    "there were 1,234,567 reasons (and 89.5% of them were good) to read on, wasn't there?",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
    "for (int i = 0; i < n; ++i) { total += values[i] * 2; }  // 2024-01-31T12:00:00Z user@example.com",
]


def hf_model_data(hf) -> dict:
    """An HF `tokenizers` model's type and what it holds besides the vocabulary: BPE merges (as pairs, however
    the library version writes them), Unigram scores."""
    m = json.loads(hf.to_str())["model"]
    out = {"type": m.get("type")}
    if "merges" in m:
        out["merges"] = [x.split(" ", 1) if isinstance(x, str) else list(x) for x in m["merges"]]
    if m.get("type") == "Unigram":
        out["scores"] = [score for _, score in m["vocab"]]
    return out


def behaviour(tok) -> dict:
    """What decides `tok`'s ids, JSON-able: settings, vocabulary, model data (merges, scores), special ids,
    eod/bos and the ids of PROBES (None where a probe is not valid input, e.g. NullTokenizer's words)."""
    probes: list[Optional[list[int]]] = []
    for text in PROBES:
        try:
            probes.append([int(i) for i in tok.encode(text)])
        except TokenizerError:
            probes.append(None)
    return {"settings": tok.settings(), "vocab_size": tok.vocab_size,
            "vocab": sorted(tok.vocabulary().items(), key=lambda kv: (kv[1], kv[0])), "model": tok.model_data(),
            "special": sorted(tok.special_ids()), "eod": tok.eod, "eod_token": tok.eod_token, "bos": tok.bos,
            "probes": probes}


def behaviour_fingerprint(tok) -> str:
    """sha256 of `behaviour(tok)`."""
    return hashlib.sha256(json.dumps(behaviour(tok), sort_keys=True).encode()).hexdigest()
