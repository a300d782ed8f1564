"""GPT-2 byte-level BPE from the user's vocab.json/merges.txt, through HF `tokenizers`.

Produces the same ids as GPT-2's reference tokenizer (and Megatron's), so data
preprocessed elsewhere and checkpoints exported to Hugging Face stay consistent.
"""
from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ..errors import TokenizerError

EOD = "<|endoftext|>"


class GPT2BPETokenizer:
    def __init__(self, vocab_file: str, merge_file: str):
        for path, what in ((vocab_file, "vocab"), (merge_file, "merges")):
            if not path or not os.path.isfile(path):
                raise TokenizerError(f"{what} file not found: {path}")
        try:
            with open(vocab_file, encoding="utf-8") as fh:
                vocab = json.load(fh)
            if not isinstance(vocab, dict) or not vocab:
                raise ValueError("expected a JSON object of token -> id")
        except ValueError as e:
            raise TokenizerError(f"{vocab_file}: corrupt vocab file ({e})") from None
        try:
            with open(merge_file, encoding="utf-8") as fh:
                lines = [ln for ln in fh.read().split("\n") if ln and not ln.startswith("#version")]
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{merge_file}: corrupt merges file (not UTF-8 text: {e.reason})") from None
        bad = next((i for i, ln in enumerate(lines) if len(ln.split(" ")) != 2), None)
        if bad is not None or not lines:
            raise TokenizerError(f"{merge_file}: corrupt merges file (line {bad if bad is not None else 0}: "
                                 "expected two symbols per line)")
        try:
            bpe = models.BPE(vocab, [tuple(ln.split(" ")) for ln in lines])
        except Exception as e:  # the Rust side reports merges that name unknown tokens
            raise TokenizerError(f"{merge_file}: merges do not match {vocab_file} ({e})") from None
        self.tok = Tokenizer(bpe)
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()
        self.vocab_file, self.merge_file = vocab_file, merge_file
        self.vocab_size = len(vocab)
        self.eod = vocab.get(EOD, self.vocab_size - 1)

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def build_tokenizer(vocab_file: str, merge_file: str) -> GPT2BPETokenizer:
    return GPT2BPETokenizer(vocab_file, merge_file)
