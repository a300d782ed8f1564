"""Megatron's three SentencePiece tokenizer types over one .model file, through the `sentencepiece` package.

They differ only in what surrounds the model's own ids, and data preprocessed with one is not valid for
another, so each keeps Megatron's exact rule: GPTSentencePieceTokenizer (plain ids, eod = eos),
Llama2Tokenizer (bos first) and SentencePieceTokenizer (extra special tokens, eod = <EOD>).
"""
from __future__ import annotations

import re
from typing import Optional
from collections.abc import Callable

from .base import Tokenizer, _need_file
from ..errors import TokenizerError


class GPTSentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model used as is (Megatron's GPTSentencePieceTokenizer): `encode_as_ids`, eod = the
    model's eos."""

    type_name = "GPTSentencePieceTokenizer"

    def __init__(self, model_file: str):
        import sentencepiece
        _need_file(model_file, "SentencePiece model")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises its own types for a bad file
            raise TokenizerError(f"{model_file}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.model_file = model_file
        self.pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        self._setup()

    def _piece(self, i: int) -> Optional[str]:
        return self.pieces[i] if 0 <= i < len(self.pieces) else None

    def _setup(self) -> None:
        self.vocab_size = len(self.pieces)
        self.eod = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.eod_token = self._piece(self.sp.eos_id())
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int, num_threads=1)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def files(self) -> dict[str, str]:
        return {"tokenizer.model": self.model_file}

    def vocabulary(self) -> dict[str, int]:
        """The pieces (with their scores, which decide a unigram model's ids) and any added special tokens."""
        vocab = {f"{p}\t{self.sp.get_score(i)!r}": i for i, p in enumerate(self.pieces)}
        vocab.update(getattr(self, "special", {}))
        return vocab

    def special_ids(self) -> frozenset:
        control = {i for i in range(len(self.pieces)) if self.sp.is_control(i)}
        return super().special_ids() | frozenset(control) | frozenset(getattr(self, "special", {}).values())

    def decode_text(self, ids, keep_special: bool = False) -> str:
        """SentencePiece's decode drops control pieces (<s>, </s>) itself: kept, they are written as pieces."""
        if not keep_special:
            return super().decode_text(ids)
        special, text, run = self.special_ids(), "", []
        for i in map(int, ids):
            if i in special and self._piece(i) is not None:
                text += self.sp.decode(run) + self.pieces[i]
                run = []
            else:
                run.append(i)
        return text + self.sp.decode(run)

    def no_eod_hint(self) -> str:
        return f"{self.model_file} has no eos piece (train it with eos_id >= 0)"


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Megatron's Llama2Tokenizer: the SentencePiece ids with the model's bos in front of every text."""

    type_name = "Llama2Tokenizer"

    def _setup(self) -> None:
        super()._setup()
        if self.bos is None:
            raise TokenizerError(f"{self.model_file}: Llama2Tokenizer needs a model with a bos piece")

    def encode(self, text: str) -> list[int]:
        return [self.bos] + self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[self.bos] + ids for ids in self.sp.encode(texts, out_type=int, num_threads=1)]


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    """Megatron's SentencePieceTokenizer: the model's pieces plus the special tokens <CLS> <SEP> <EOD> <MASK>
    and the pad/bos/eos pieces (<PAD>/<BOS>/<EOS> when the model has none), appended after the model's ids
    when new; those strings in text become their ids, the text between them is encoded piece by piece.
    eod is <EOD>, as in Megatron."""

    type_name = "SentencePieceTokenizer"

    def _setup(self) -> None:
        index = {p: i for i, p in enumerate(self.pieces)}
        self.special: dict[str, int] = {}          # insertion order = Megatron's (earliest match wins ties)
        self.added: list[str] = []

        def add(token: str) -> None:
            if token not in index:
                index[token] = len(index)
                self.added.append(token)
            self.special[token] = index[token]
        for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            add(t)
        for get, fallback in ((self.sp.pad_id, "<PAD>"), (self.sp.bos_id, "<BOS>"), (self.sp.eos_id, "<EOS>")):
            add(self._piece(get()) or fallback)
        self.inv_special = {i: t for t, i in self.special.items()}
        self.vocab_size = len(index)
        self.eod, self.eod_token = self.special["<EOD>"], "<EOD>"
        self.bos = self.special[self._piece(self.sp.bos_id()) or "<BOS>"]
        self._split = re.compile("|".join(re.escape(t) for t in self.special))

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        plain = [i for i, t in enumerate(texts) if not self._split.search(t)]
        out: list = [None] * len(texts)
        for i, ids in zip(plain, self.sp.encode([texts[i] for i in plain], out_type=int, num_threads=1)):
            out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self._encode_specials(t)
        return out

    def _encode_specials(self, text: str) -> list[int]:
        ids, at = [], 0
        while True:
            hits = [(text.find(tok, at), n, tok) for n, tok in enumerate(self.special) if text.find(tok, at) >= 0]
            if not hits:
                break
            pos, _, tok = min(hits)
            ids += self.sp.encode(text[at:pos], out_type=int)
            ids.append(self.special[tok])
            at = pos + len(tok)
        return ids + self.sp.encode(text[at:], out_type=int)

    def decode(self, ids) -> str:
        text, run = "", []
        for i in ids:
            i = int(i)
            if i in self.inv_special:
                text += self.sp.decode(run) + " " + self.inv_special[i] + " "
                run = []
            else:
                run.append(i)
        return text + self.sp.decode(run)

    decode_text = Tokenizer.decode_text   # decode names Megatron's special tokens itself


SP_TYPES: dict[str, Callable] = {"SentencePieceTokenizer": SentencePieceTokenizer,
                                 "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer,
                                 "Llama2Tokenizer": Llama2Tokenizer}
