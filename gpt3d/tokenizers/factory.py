"""Building a tokenizer: from Megatron's flags (`build_tokenizer`, `tokenizer_from_config`), from the copy a
checkpoint carries (`load_from_dir`, `tokenizer_for_checkpoint`), and the vocabulary a model is built with.

The one place that knows every tokenizer type (base.py holds the interface and the types without extra
dependencies; huggingface.py and sentencepiece.py the others), so the types never import each other.
"""
from __future__ import annotations

import os
from typing import Optional

from ..config.schema import DEFAULT_VOCAB_SIZE
from ..errors import TokenizerError, warn
from .base import CHECKPOINT_DIR, TYPES, GPT2BPETokenizer, NullTokenizer, Tokenizer, sha256_file


def load_from_dir(directory: str, manifest: dict) -> Tokenizer:
    """Rebuild the tokenizer `save_files` wrote; every file must match the manifest's hash."""
    kind = manifest.get("type")
    if kind not in TYPES:
        raise TokenizerError(f"{directory}: unknown tokenizer type {kind!r} in the manifest")
    for name, digest in manifest.get("files", {}).items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: tokenizer file missing")
        if sha256_file(path) != digest:
            raise TokenizerError(f"{path}: tokenizer file does not match its recorded sha256 (corrupt or replaced)")
    s = manifest.get("settings", {})
    if kind == "GPT2BPETokenizer":
        tok = GPT2BPETokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    elif kind == "HuggingFaceTokenizer":
        from .huggingface import HuggingFaceTokenizer
        tok = HuggingFaceTokenizer(directory)
    elif kind == "NullTokenizer":
        tok = NullTokenizer(s["vocab_size"])
    else:
        from .sentencepiece import SP_TYPES
        tok = SP_TYPES[kind](os.path.join(directory, "tokenizer.model"))
    if not tok.matches(manifest):
        raise TokenizerError(f"{directory}: rebuilt {kind} does not match the manifest's fingerprint")
    return tok


def flags_for_dir(directory: str, manifest: dict) -> str:
    """The command-line flags that name the tokenizer `save_files` wrote into `directory`."""
    kind = manifest.get("type")
    if kind == "GPT2BPETokenizer":
        return (f"--vocab-file {os.path.join(directory, 'vocab.json')} "
                f"--merge-file {os.path.join(directory, 'merges.txt')}")
    if kind == "NullTokenizer":
        return f"--tokenizer-type NullTokenizer --vocab-size {manifest.get('settings', {}).get('vocab_size')}"
    model = directory if kind == "HuggingFaceTokenizer" else os.path.join(directory, "tokenizer.model")
    return f"--tokenizer-type {kind} --tokenizer-model {model}"


# ----- construction ------------------------------------------------------------------------------------------------
_noted: set = set()


def build_tokenizer(vocab_file: Optional[str] = None, merge_file: Optional[str] = None, *,
                    tokenizer_type: str = "GPT2BPETokenizer", tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None, quiet: bool = False) -> Tokenizer:
    """The tokenizer Megatron's `--tokenizer-type` names, from its flags' values (its manifest hashed now).
    A HuggingFaceTokenizer's note (ids may differ from AutoTokenizer's) is warned once per process unless
    `quiet` (worker processes, ranks other than 0)."""
    kind = tokenizer_type or "GPT2BPETokenizer"
    if kind == "GPT2BPETokenizer":
        if not (vocab_file and merge_file):
            raise TokenizerError("GPT2BPETokenizer needs --vocab-file and --merge-file")
        tok = GPT2BPETokenizer(vocab_file, merge_file)
    elif kind == "NullTokenizer":
        tok = NullTokenizer(vocab_size)
    elif kind not in TYPES:
        raise TokenizerError(f"unknown --tokenizer-type {kind}; choose from {', '.join(TYPES)}")
    elif not tokenizer_model:
        raise TokenizerError(f"{kind} needs --tokenizer-model")
    elif kind == "HuggingFaceTokenizer":
        from .huggingface import HuggingFaceTokenizer
        tok = HuggingFaceTokenizer(tokenizer_model)
    else:
        from .sentencepiece import SP_TYPES
        tok = SP_TYPES[kind](tokenizer_model)
    tok.manifest()
    note = getattr(tok, "note", None)
    if note and not quiet and note not in _noted:
        _noted.add(note)
        warn(note)
    return tok


def tokenizer_from_config(data, vocab_size: Optional[int] = None, quiet: bool = False) -> Tokenizer:
    """From a DataConfig (tokenizer_type, tokenizer_model, vocab_file, merge_file); NullTokenizer takes the
    model's --vocab-size."""
    return build_tokenizer(data.vocab_file, data.merge_file, tokenizer_type=data.tokenizer_type,
                           tokenizer_model=data.tokenizer_model, vocab_size=vocab_size, quiet=quiet)


def model_vocab_size(tok: Optional[Tokenizer], requested: Optional[int], padded: Optional[int] = None) -> int:
    """The vocabulary the model is built with: --padded-vocab-size if given (Megatron-DeepSpeed's padded
    vocabulary, every row in the loss), else --vocab-size if given (NullTokenizer: its ids plus eod), else the
    tokenizer's; with no tokenizer (mock data) GPT-2's 50,257 where neither size is given."""
    if tok is None:
        return padded or requested or DEFAULT_VOCAB_SIZE
    base = tok.vocab_size if isinstance(tok, NullTokenizer) or not requested else requested
    if base < tok.vocab_size:
        raise TokenizerError(f"--vocab-size {requested} is smaller than the tokenizer's vocabulary "
                             f"({tok.vocab_size}, {tok.type_name} {tok.describe()})")
    if padded is not None and padded < base:
        raise TokenizerError(f"--padded-vocab-size {padded} is smaller than the vocabulary ({base}, "
                             f"{tok.type_name} {tok.describe()})")
    return padded or base


def tokenizer_for_checkpoint(data: dict, model_vocab: int, flags: Optional[dict] = None,
                             checkpoint_dir: Optional[str] = None, manifest: Optional[dict] = None) -> Tokenizer:
    """The tokenizer for eval/generate/export of a checkpoint: the copy the checkpoint carries (`manifest`,
    files in `checkpoint_dir/tokenizer`) unless tokenizer flags are given, else the checkpoint's recorded
    settings with the flags' values on top. NullTokenizer's ids are the model's vocabulary less its eod."""
    flags = {k: v for k, v in (flags or {}).items() if v}
    if manifest and checkpoint_dir and not flags:
        tok = load_from_dir(os.path.join(checkpoint_dir, CHECKPOINT_DIR), manifest)
    else:
        s = {k: flags.get(k) or data.get(k) for k in ("tokenizer_type", "tokenizer_model", "vocab_file",
                                                      "merge_file")}
        kind = s["tokenizer_type"] or "GPT2BPETokenizer"
        if kind == "GPT2BPETokenizer" and not (s["vocab_file"] and s["merge_file"]):
            raise TokenizerError("the checkpoint names no tokenizer: give --vocab-file and --merge-file, or "
                                 "--tokenizer-type with --tokenizer-model")
        tok = build_tokenizer(s["vocab_file"], s["merge_file"], tokenizer_type=kind,
                              tokenizer_model=s["tokenizer_model"], vocab_size=model_vocab - 1)
        if manifest and not tok.matches(manifest):
            warn(f"the tokenizer named by the flags ({tok.type_name} {tok.describe()}) is not the one the "
                 f"checkpoint was trained with ({manifest.get('type')}); using the flags'")
    if tok.vocab_size > model_vocab:
        raise TokenizerError(f"{tok.type_name} ({tok.describe()}) has {tok.vocab_size} ids but the model's "
                             f"vocabulary is {model_vocab}: not the tokenizer it was trained with")
    return tok
