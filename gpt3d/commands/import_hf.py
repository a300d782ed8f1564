"""`gpt3d import-hf`: a Hugging Face model directory, read as untrusted input, becomes a gpt3d checkpoint
(gpt3d/interop/hf_import.py does it)."""
from __future__ import annotations

import argparse
import os

from ..errors import os_errors_are_user_errors
from .output import emit, note


def register(sub) -> None:
    p = sub.add_parser("import-hf", help="turn a Hugging Face GPT-2/Llama directory into a gpt3d checkpoint")
    p.add_argument("--input", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--save", required=True, help="new checkpoint directory")
    p.set_defaults(func=run)


@os_errors_are_user_errors
def run(args: argparse.Namespace) -> int:
    from ..interop.hf_import import import_hf
    emit(import_hf(src=args.input, save=args.save), as_json=True)
    note(f"train from it: gpt3d train --config {os.path.join(args.save, 'model.yaml')} --load {args.save} "
         "--finetune ...")
    return 0
