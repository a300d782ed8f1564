"""The run's tokenizer inside its checkpoint: the model's ids mean nothing without it.

Saved: a copy of the tokenizer's files under tokenizer/ (rank 0, through the Writer) and its manifest as
meta.json "tokenizer" (type, settings, each file's sha256, vocab_size, eod and its name, fingerprint), so
`eval`, `generate` and `export-hf` rebuild it from the checkpoint alone (tokenizers/factory.py load_from_dir),
from any directory, after the original files are gone. Mock-data runs have no tokenizer and save none.

Loaded: nothing is restored (a run builds its tokenizer from its own flags), but a checkpoint whose
tokenizer has another fingerprint is refused with one line: every embedding row would mean another token.
The fingerprint follows what the tokenizer does (vocabulary, special tokens, eod/bos, the ids of probe texts;
tokenizers/fingerprint.py), not its file bytes or paths, so the original files of a tokenizer that import-hf or
export-hf re-wrote are accepted; a checkpoint written before that recorded a hash of the files, and the same
files are accepted against it (`Tokenizer.matches`). Checkpoints without a tokenizer (mock data, or saved
before checkpoints carried one) are accepted as they are.
"""
from __future__ import annotations

import os
from typing import Optional

from ..tokenizers.base import CHECKPOINT_DIR, Tokenizer, sha256_file
from ..tokenizers.factory import flags_for_dir
from ..errors import CheckpointError
from .store import Reader, Writer


class TokenizerPart:
    """`tokenizer` is the run's (None for mock data); only the writer of shared files (rank 0) copies them."""

    def __init__(self, tokenizer: Optional[Tokenizer], writes_files: bool = True):
        self.tok, self.writes_files = tokenizer, writes_files

    def save(self, w: Writer) -> None:
        if self.tok is None:
            return
        manifest = self.tok.manifest()
        if self.writes_files:
            for name, src in self.tok.files().items():
                copy = w.copy(f"{CHECKPOINT_DIR}/{name}", src)
                if sha256_file(copy) != manifest["files"][name]:
                    raise CheckpointError(f"tokenizer file {src} changed on disk since this run read it; "
                                          "restore it (the run's ids come from the version it read)")
        w.meta("tokenizer", manifest)

    def load(self, r: Reader) -> bool:
        saved = r.meta.get("tokenizer")
        if self.tok is None or not saved:
            return False
        if not self.tok.matches(saved):
            names = ", ".join(saved.get("files", {})) or f"vocab {saved.get('vocab_size')}"
            raise CheckpointError(
                f"checkpoint {r.path} was trained with another tokenizer ({saved.get('type')}: {names}, "
                f"fingerprint {str(saved.get('fingerprint'))[:12]}) than this run's ({self.tok.type_name}: "
                f"{self.tok.describe()}, fingerprint {self.tok.fingerprint[:12]}); resume with its copy: "
                f"{flags_for_dir(os.path.join(r.path, CHECKPOINT_DIR), saved)}")
        return False   # checked, nothing restored
