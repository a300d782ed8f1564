"""Tokenizer files in and out of gpt3d: `import-hf` copies an HF directory's tokenizer into a checkpoint
(import_tokenizer); `export-hf` writes tokenizer files that `transformers.AutoTokenizer` loads and that
encode exactly as gpt3d.

A model exported with a tokenizer that splits text differently silently gets other ids and other losses
in transformers. So every tokenizer type is written as one tokenizer.json (HF `tokenizers` format, loaded
by AutoTokenizer as a PreTrainedTokenizerFast), with bos/eos/... named only where gpt3d itself treats
them as special in text, and the result is checked against gpt3d's own encoder on probe texts before the
export is published; where they disagree the export is refused with one line.
"""
from __future__ import annotations

import json
import os
import shutil

from .fingerprint import PROBES
from .huggingface import HuggingFaceTokenizer
from .sentencepiece import SentencePieceTokenizer
from .base import GPT2BPETokenizer, NullTokenizer, Tokenizer, plain
from ..errors import TokenizerError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def to_hf_tokenizer(tok: Tokenizer):
    """gpt3d tokenizer -> an HF `tokenizers.Tokenizer` meant to encode identically."""
    from tokenizers import Tokenizer as HFTok
    if isinstance(tok, GPT2BPETokenizer):
        return HFTok.from_str(tok.tok.to_str())
    if isinstance(tok, HuggingFaceTokenizer):
        return plain(HFTok.from_file(tok.file))    # no stored truncation/padding in the export either
    if isinstance(tok, NullTokenizer):
        from tokenizers import models, pre_tokenizers
        t = HFTok(models.WordLevel({str(i): i for i in range(tok.vocab_size)}, unk_token=str(tok.eod)))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return t
    return _from_sentencepiece(tok)


def _from_sentencepiece(tok):
    from ..console.quiet import quiet_imports
    try:
        from sentencepiece import sentencepiece_model_pb2
        with quiet_imports():
            from transformers.convert_slow_tokenizer import SpmConverter
        build = SpmConverter.build_tokenizer_from_spm_proto
    except (ImportError, AttributeError) as e:
        raise TokenizerError(f"export-hf of a {tok.type_name} needs transformers >= 5 and protobuf to convert "
                             f"{tok.model_file} into tokenizer.json ({e})") from None
    from tokenizers import AddedToken, processors
    proto = sentencepiece_model_pb2.ModelProto()
    with open(tok.model_file, "rb") as fh:
        proto.ParseFromString(fh.read())
    model_type = proto.trainer_spec.model_type
    specials = set(getattr(tok, "special", {}))
    if model_type == 1:       # unigram: a lattice would match control pieces in text, SentencePiece never does
        hide = proto.normalizer_spec.escape_whitespaces   # then no plain space survives normalization
        vocab = [(" " + p.piece if hide and p.type in (UNKNOWN, CONTROL, UNUSED) and p.piece not in specials
                  else p.piece, p.score) for p in proto.pieces]
    elif model_type == 2:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    else:
        raise TokenizerError(f"{tok.model_file}: SentencePiece model type {model_type} (word/char) has no "
                             "tokenizer.json equivalent; cannot export its tokenizer")
    t = build(proto, vocab)
    if isinstance(tok, SentencePieceTokenizer):       # Megatron's specials, new ones after the model's ids
        t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.special])
        wrong = {s: t.token_to_id(s) for s, i in tok.special.items() if t.token_to_id(s) != i}
        if wrong:
            raise TokenizerError(f"{tok.model_file}: special tokens got other ids in tokenizer.json ({wrong})")
    if tok.type_name == "Llama2Tokenizer":
        bos = tok.pieces[tok.bos].strip() or "<s>"      # a label; the id is what counts
        t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                         special_tokens=[(bos, tok.bos)])
    return t


def verify(tok: Tokenizer, hf, texts: list) -> None:
    for text in texts:
        if isinstance(tok, NullTokenizer):
            text = " ".join(str(i % tok.vocab_size) for i in range(0, 3 * len(text), 3))
        ours, theirs = tok.encode(text), hf.encode(text).ids
        if ours != theirs:
            raise TokenizerError(f"the exported tokenizer.json would encode {text[:40]!r} as {theirs[:12]} but "
                                 f"{tok.type_name} gives {ours[:12]}; refusing to export a tokenizer that "
                                 "differs from training")


def data_sample(data: dict, tok: Tokenizer, count: int = 200, max_tokens: int = 512) -> list:
    """Up to `count` texts decoded from a checkpoint's training data (its --data-path .bin/.idx, sequences
    spread over each file, at most `max_tokens` ids each): real text for `verify` beside the probes.
    [] for mock data, or where the files are gone or unreadable (the probes still run)."""
    from ..errors import DataError
    from ..data.gpt_dataset import parse_data_path
    from ..data.indexed import MMapIndexedDataset
    if data.get("mock_data") or not data.get("data_path"):
        return []
    try:
        prefixes, _ = parse_data_path(data["data_path"])
    except DataError:
        return []
    texts: list = []
    per = max(1, count // len(prefixes))
    for prefix in prefixes:
        try:
            ds = MMapIndexedDataset(prefix)
        except DataError:
            continue
        for i in sorted({j * len(ds) // per for j in range(per)} if len(ds) else ()):
            ids = [int(x) for x in ds.get(i, 0, min(max_tokens, int(ds.sizes[i])))]
            texts.append(tok.decode([x for x in ids if x < tok.vocab_size]))
    return texts


def export_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: int, samples: list = ()) -> dict:
    """Writes tokenizer.json + tokenizer_config.json (and the source files, for reference) into `out_dir`,
    after checking it encodes the probes and `samples` (e.g. `data_sample`'s) as gpt3d does;
    returns {"bos_token_id", "eos_token_id", "files"}."""
    hf = to_hf_tokenizer(tok)
    verify(tok, hf, PROBES + list(samples))
    hf.save(os.path.join(out_dir, "tokenizer.json"))
    added = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    names = dict(getattr(tok, "special_names", {}))
    if tok.eod_token:
        names.setdefault("eos_token", tok.eod_token)
    if tok.bos is not None:
        names.setdefault("bos_token", hf.id_to_token(tok.bos))
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if names.get(key) in added:          # only names gpt3d also treats as special in text
            config[key] = names[key]
    if not added:
        # gpt3d treats no string in text as special (GPT-2 BPE, SentencePiece's own pieces, NullTokenizer's
        # ids): name eos/bos all the same, so that AutoTokenizer reports their ids, and split_special_tokens
        # keeps their strings in text ordinary text, as in gpt3d
        for key, i in (("eos_token", tok.eod), ("bos_token", tok.bos)):
            if i is not None and hf.id_to_token(i) is not None:
                config[key] = hf.id_to_token(i)
                config["split_special_tokens"] = True
    if names.get("chat_template"):
        config["chat_template"] = names["chat_template"]
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
    files = ["tokenizer.json", "tokenizer_config.json"]
    for name, path in tok.files().items():
        if name in ("vocab.json", "merges.txt", "tokenizer.model"):      # for reference; never loaded
            shutil.copyfile(path, os.path.join(out_dir, name))
            files.append(name)
    bos = tok.bos if tok.bos is not None else tok.eod
    return {"bos_token_id": bos, "eos_token_id": tok.eod, "files": files}


def import_tokenizer(src: str, save: str, data) -> None:
    """import-hf: the HF directory's GPT-2 vocab.json + merges.txt, else its tokenizer.json
    (HuggingFaceTokenizer), copied beside the checkpoint and named in `data` (its DataConfig)."""
    gpt2 = [os.path.join(src, f) for f in ("vocab.json", "merges.txt")]
    if all(os.path.isfile(f) for f in gpt2):
        for f in gpt2:
            shutil.copyfile(f, os.path.join(save, os.path.basename(f)))
        data.vocab_file = os.path.abspath(os.path.join(save, "vocab.json"))
        data.merge_file = os.path.abspath(os.path.join(save, "merges.txt"))
    elif os.path.isfile(os.path.join(src, "tokenizer.json")):
        tok_dir = os.path.join(save, "hf_tokenizer")
        os.makedirs(tok_dir, exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(src, f)):
                shutil.copyfile(os.path.join(src, f), os.path.join(tok_dir, f))
        data.tokenizer_type, data.tokenizer_model = "HuggingFaceTokenizer", os.path.abspath(tok_dir)
