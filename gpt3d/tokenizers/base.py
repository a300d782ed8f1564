"""Megatron's tokenizer types behind one interface, plus the files that make a tokenizer portable.

Megatron users name a tokenizer by `--tokenizer-type` and give its files; the ids it produces are baked
into their .bin data, so every type here gives exactly the ids Megatron's class of the same name gives.
A tokenizer can copy its files into a directory and be rebuilt from that directory alone (`save_files` /
`load_from_dir`), and its `fingerprint` hashes what it does (fingerprint.py: its vocabulary, merges or
scores, special tokens, eod/bos and the ids of a fixed set of probe texts), not its file bytes or paths: a
checkpoint carries its tokenizer and a resume with one that encodes differently is refused, while the same tokenizer
re-written (import-hf's tokenizer.json) or moved is accepted. Checkpoints from before hashed the files' bytes
(`file_fingerprint`); `matches` accepts either.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Optional

from ..errors import TokenizerError
from .fingerprint import behaviour_fingerprint, hf_model_data

EOD = "<|endoftext|>"
TYPES = ("GPT2BPETokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
         "Llama2Tokenizer", "NullTokenizer")
CHECKPOINT_DIR = "tokenizer"   # where a checkpoint keeps its copy of the files (checkpoint/tokenizer_part.py)



def sha256_file(path: str) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _batch(tok):
    """`encode_batch_fast` (no offsets) where this `tokenizers` has it."""
    return getattr(tok, "encode_batch_fast", tok.encode_batch)


def plain(tok):
    """An HF `tokenizers.Tokenizer` without the truncation and padding its tokenizer.json may store: every
    id of every text, as `AutoTokenizer(text).input_ids` (Megatron's HuggingFaceTokenizer) gives them."""
    tok.no_truncation()
    tok.no_padding()
    return tok


def _need_file(path: Optional[str], what: str) -> str:
    if not path or not os.path.isfile(path):
        raise TokenizerError(f"{what} not found: {path}")
    return path


class Tokenizer:
    """The interface every type implements: vocab_size, eod (id) and eod_token (name), encode /
    encode_batch / decode, `files()` (canonical file name -> path) for save_files, and `vocabulary()` /
    `special_ids()` for the fingerprint."""

    type_name = ""
    vocab_size: int
    eod: Optional[int] = None
    eod_token: Optional[str] = None
    bos: Optional[int] = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def files(self) -> dict[str, str]:
        return {}

    def settings(self) -> dict:
        """Non-file settings that change the ids (part of the fingerprint)."""
        return {}

    def vocabulary(self) -> dict[str, int]:
        """Token string -> id, special/added tokens included (part of the fingerprint)."""
        return {}

    def model_data(self) -> dict:
        """What decides the ids beyond the vocabulary: BPE merges, unigram scores (part of the fingerprint)."""
        return {}

    def special_ids(self) -> frozenset:
        """Ids that mark rather than spell text: eod, bos and the tokenizer's own special tokens. `generate`
        leaves them out of the text it prints unless asked to keep them."""
        return frozenset(i for i in (self.eod, self.bos) if i is not None)

    def decode_text(self, ids, keep_special: bool = False) -> str:
        """The text of `ids`, without the special ids (see special_ids) unless `keep_special`."""
        drop = frozenset() if keep_special else self.special_ids()
        return self.decode([int(i) for i in ids if int(i) not in drop])

    # Megatron's method names
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids) -> str:
        return self.decode(ids)

    def require_eod(self) -> int:
        if self.eod is None:
            raise TokenizerError(f"{self.type_name} {self.describe()} has no end-of-document (eos) token; "
                                 + self.no_eod_hint())
        return self.eod

    def no_eod_hint(self) -> str:
        """What the user can do about a missing eod (the end of require_eod's message)."""
        return "the tokenizer's files name none"

    def describe(self) -> str:
        return ", ".join(os.path.basename(p) for p in self.files().values()) or f"vocab {self.vocab_size}"

    def manifest(self) -> dict:
        """type, settings, each file's sha256, vocab_size, eod, eod_token and the fingerprint. Hashed once
        (build_tokenizer does it right after reading the files), so it describes the files as this
        tokenizer read them even if they change on disk later."""
        if getattr(self, "_manifest", None) is None:
            files = {name: sha256_file(path) for name, path in sorted(self.files().items())}
            core = {"type": self.type_name, "files": files, "settings": self.settings()}
            self._file_fingerprint = hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()
            fp = behaviour_fingerprint(self)
            self._manifest = {**core, "vocab_size": self.vocab_size, "eod": self.eod, "eod_token": self.eod_token,
                              "fingerprint": fp}
        return json.loads(json.dumps(self._manifest))   # a copy

    @property
    def fingerprint(self) -> str:
        """sha256 of `behaviour()`: what the tokenizer does, never its file bytes or paths."""
        return self.manifest()["fingerprint"]

    @property
    def file_fingerprint(self) -> str:
        """The fingerprint checkpoints recorded before it followed behaviour: sha256 over the type, the settings
        and the files' contents."""
        self.manifest()
        return self._file_fingerprint

    def matches(self, manifest: Optional[dict]) -> bool:
        """Whether a recorded tokenizer (a checkpoint's manifest) is this one: its fingerprint is this
        tokenizer's behavioural one, or (an older checkpoint) the hash of these very files."""
        return bool(manifest) and manifest.get("fingerprint") in (self.fingerprint, self.file_fingerprint)

    def save_files(self, directory: str) -> dict:
        """Copy the tokenizer's files into `directory` under canonical names; returns the manifest that
        `load_from_dir(directory, manifest)` needs (type, settings, file hashes, fingerprint)."""
        os.makedirs(directory, exist_ok=True)
        for name, path in self.files().items():
            shutil.copyfile(path, os.path.join(directory, name))
        return self.manifest()


# ----- GPT-2 byte-level BPE ------------------------------------------------------------------------------------
class GPT2BPETokenizer(Tokenizer):
    """GPT-2 BPE from vocab.json + merges.txt through HF `tokenizers`: the ids of GPT-2's reference
    tokenizer and Megatron's (`<|endoftext|>` is ordinary text here, as there; it is only the eod)."""

    type_name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers
        _need_file(vocab_file, "vocab file")
        _need_file(merge_file, "merges file")
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
        except Exception as e:  # noqa: BLE001 - the Rust side reports merges that name unknown tokens
            raise TokenizerError(f"{merge_file}: merges do not match {vocab_file} ({e})") from None
        self.tok = HFTok(bpe)
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()
        self.vocab_file, self.merge_file = vocab_file, merge_file
        self.vocab_size = len(vocab)
        # Megatron's GPT2BPETokenizer requires <|endoftext|>; without it there is no eod (never a stand-in
        # id, which would be a real token), and what needs one (--append-eod) is refused by require_eod
        self.eod = vocab.get(EOD)
        self.eod_token = EOD if EOD in vocab else None

    def no_eod_hint(self) -> str:
        return f"{self.vocab_file} has no {EOD} entry"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in _batch(self.tok)(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def files(self) -> dict[str, str]:
        return {"vocab.json": self.vocab_file, "merges.txt": self.merge_file}

    def vocabulary(self) -> dict[str, int]:
        return self.tok.get_vocab(with_added_tokens=True)

    def model_data(self) -> dict:
        return hf_model_data(self.tok)


# ----- any tokenizer.json --------------------------------------------------------------------------------------
# ----- ids as text -----------------------------------------------------------------------------------------------
class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer (benchmarks, pre-tokenized data): text is space-separated ids; the vocabulary
    is --vocab-size ids plus one eod id (= --vocab-size) after them."""

    type_name = "NullTokenizer"

    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) <= 0:
            raise TokenizerError("NullTokenizer needs --vocab-size (a positive number of ids)")
        self.base = int(vocab_size)
        self.vocab_size = self.base + 1
        self.eod, self.eod_token = self.base, str(self.base)

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise TokenizerError(f"NullTokenizer takes space-separated integer ids, got {text[:40]!r}") from None
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise TokenizerError(f"NullTokenizer: id {bad} is outside the vocabulary 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def settings(self) -> dict:
        return {"vocab_size": self.base}

    def describe(self) -> str:
        return f"with --vocab-size {self.base}"
