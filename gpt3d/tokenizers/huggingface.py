"""Megatron's HuggingFaceTokenizer over a tokenizer.json, through HF `tokenizers` (not transformers).

Its ids must be exactly those Megatron's class gets from `AutoTokenizer(text).input_ids`, which is the file's
own pipeline minus any stored truncation/padding; what transformers may add on top (a model-specific
tokenizer_class, add_bos_token) is detected and warned about rather than silently reproduced.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .fingerprint import hf_model_data
from .base import Tokenizer, _batch, _need_file, plain
from ..errors import TokenizerError

# end-of-document names tried, in order, when a tokenizer.json comes without a tokenizer_config.json
KNOWN_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
KNOWN_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>")


def _token_name(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# tokenizer classes under which transformers' AutoTokenizer encodes with tokenizer.json as it is
PLAIN_HF_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _transformers_note(path: str, cfg: dict) -> Optional[str]:
    """Why AutoTokenizer (so Megatron's HuggingFaceTokenizer) may give other ids than tokenizer.json alone:
    a model-specific tokenizer_class (transformers may rebuild the pipeline, e.g. LlamaTokenizer's) or
    add_bos_token/add_eos_token (applied on top of the post-processor by such classes)."""
    what = []
    cls = cfg.get("tokenizer_class")
    if isinstance(cls, str) and cls not in PLAIN_HF_CLASSES:
        what.append(f"tokenizer_class {cls}")
    what += [f"{k} true" for k in ("add_bos_token", "add_eos_token") if cfg.get(k) is True]
    if not what:
        return None
    return (f"{path} sets {' and '.join(what)}, which transformers' AutoTokenizer (and so Megatron's "
            "HuggingFaceTokenizer) may apply on top of tokenizer.json: its ids may differ from gpt3d's, which "
            "come from tokenizer.json alone")


class HuggingFaceTokenizer(Tokenizer):
    """A tokenizer.json (or a directory holding one) through HF `tokenizers`: ids exactly as its own
    `encode` gives them, post-processor special tokens (e.g. a BOS) included, without the truncation or
    padding the file may store, like Megatron's HuggingFaceTokenizer (`AutoTokenizer(text).input_ids`).
    eos/bos names come from a tokenizer_config.json or special_tokens_map.json beside it, else from a
    special token with a well-known eos name."""

    type_name = "HuggingFaceTokenizer"
    CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
    note: Optional[str] = None       # why transformers may encode differently (build_tokenizer warns once)

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTok
        if path and os.path.isdir(path):
            directory, file = path, os.path.join(path, "tokenizer.json")
        else:
            directory, file = os.path.dirname(path or ""), path
        _need_file(file, "tokenizer.json")
        try:
            self.tok = HFTok.from_file(file)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own types for a bad file
            raise TokenizerError(f"{file}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        plain(self.tok)
        self.file = file
        self.configs = {n: os.path.join(directory, n) for n in self.CONFIGS
                        if os.path.isfile(os.path.join(directory, n))}
        names: dict = {}
        for n in reversed(self.CONFIGS):          # tokenizer_config.json wins
            if n in self.configs:
                try:
                    with open(self.configs[n], encoding="utf-8") as fh:
                        cfg = json.load(fh)
                except ValueError as e:
                    raise TokenizerError(f"{self.configs[n]}: not valid JSON ({e})") from None
                if not isinstance(cfg, dict):
                    raise TokenizerError(f"{self.configs[n]}: not a JSON object")
                for k in ("eos_token", "bos_token", "unk_token", "pad_token"):
                    if _token_name(cfg.get(k)):
                        names[k] = _token_name(cfg.get(k))
                if n == "tokenizer_config.json" and isinstance(cfg.get("chat_template"), str):
                    names["chat_template"] = cfg["chat_template"]
                if n == "tokenizer_config.json":
                    self.note = _transformers_note(self.configs[n], cfg)
        self.special_names = names
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        specials = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        eos = names.get("eos_token") or next((n for n in KNOWN_EOS if n in specials), None)
        self.eod_token = eos if eos is not None and eos in vocab else None
        self.eod = vocab[self.eod_token] if self.eod_token else None
        bos = names.get("bos_token") or next((n for n in KNOWN_BOS if n in specials), None)
        self.bos = vocab.get(bos) if bos else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in _batch(self.tok)(texts)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def files(self) -> dict[str, str]:
        return {"tokenizer.json": self.file, **self.configs}

    def vocabulary(self) -> dict[str, int]:
        return self.tok.get_vocab(with_added_tokens=True)

    def model_data(self) -> dict:
        return hf_model_data(self.tok)

    def special_ids(self) -> frozenset:
        added = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        return super().special_ids() | frozenset(added)

    def no_eod_hint(self) -> str:
        return "name one as eos_token in a tokenizer_config.json beside tokenizer.json"
