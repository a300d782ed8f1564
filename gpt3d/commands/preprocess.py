"""`gpt3d preprocess`: Megatron's tools/preprocess_data.py flags over the library (gpt3d/data/preprocess.py).
Imports no torch: it runs where only the tokenizer and numpy are needed."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..data.preprocess import preprocess
from ..errors import os_errors_are_user_errors
from ..tokenizers.base import TYPES
from .output import emit


def register(sub) -> None:
    p = sub.add_parser("preprocess", help="tokenize JSONL / Parquet into Megatron .bin/.idx")
    add_arguments(p)   # Megatron's argument set
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, nargs="+",
                   help="JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet files; quoted globs are expanded")
    p.add_argument("--output-prefix", required=True, nargs="+",
                   help="writes PREFIX_{key}_document.bin/.idx: one prefix for all inputs, one per input, or "
                        "one containing {name} (each input's file name without extensions) for one output "
                        "per shard")
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=list(TYPES),
                   help="tokenizer, by Megatron's name (see the README's table)")
    p.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    p.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    p.add_argument("--tokenizer-model", help="HuggingFaceTokenizer: tokenizer.json or its directory; "
                                             "SentencePiece types: the .model file")
    p.add_argument("--vocab-size", type=int, help="NullTokenizer: number of ids (eod is one more)")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys (Parquet: columns) to tokenize; a value must be a string or a list of strings")
    p.add_argument("--append-eod", action="store_true", help="end every non-empty document with the eod token")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (one thread each)")
    p.add_argument("--log-interval", type=int, default=100000,
                   help="documents between progress lines off a terminal, besides one every ~10 s (on a "
                        "terminal a progress bar refreshes instead)")
    p.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="(Megatron's; only mmap exists)")


@os_errors_are_user_errors
def run(args: argparse.Namespace) -> int:
    """The command: bad input raises DataError / TokenizerError (exit 2, one line printed by the CLI)."""
    s = preprocess(args.input, args.output_prefix, args.vocab_file, args.merge_file, args.json_keys,
                   args.append_eod, args.workers, tokenizer_type=args.tokenizer_type,
                   tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
                   log_interval=args.log_interval)
    emit(f"processed {s['docs']:,} documents ({s['empty']:,} empty) from {s['files']} file(s), "
         f"{s['tokens']:,} tokens ({s['dtype']}), {s['bytes'] / 2 ** 20:,.1f} MB in {s['seconds']:.1f}s: "
         f"{s['docs_per_s']:,.0f} docs/s, {s['mb_per_s']:.2f} MB/s, {s['tokens_per_s']:,.0f} tokens/s -> "
         + ", ".join(p + ".bin/.idx" for p in s["outputs"]))
    return 0


def main(argv: Optional[list] = None) -> int:
    """`python -m gpt3d.commands.preprocess ...` is `gpt3d preprocess ...`."""
    from ..cli import main as cli_main
    return cli_main(["preprocess", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
