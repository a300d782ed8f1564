"""`gpt3d export-hf`: a checkpoint written as a Hugging Face model directory (gpt3d/interop/hf.py does it)."""
from __future__ import annotations

import argparse

from ..errors import os_errors_are_user_errors
from ..model.build import DTYPES
from .inference import add_tokenizer_flags
from .output import emit


def register(sub) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face model directory")
    p.add_argument("--load", required=True, help="checkpoint root (uses `latest`) or one iter_XXXXXXX directory")
    p.add_argument("--output", required=True, help="new directory for config.json, model.safetensors, tokenizer")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype (auto: as saved)")
    add_tokenizer_flags(p)
    p.set_defaults(func=run)


@os_errors_are_user_errors
def run(args: argparse.Namespace) -> int:
    from ..interop.hf import export_hf
    emit(export_hf(load=args.load, output=args.output, dtype=args.dtype, vocab_file=args.vocab_file,
                   merge_file=args.merge_file, tokenizer_type=args.tokenizer_type,
                   tokenizer_model=args.tokenizer_model), as_json=True)
    return 0
