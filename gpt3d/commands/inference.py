"""`gpt3d eval` and `gpt3d generate`: their flags, checked, over gpt3d/inference/generate.py (one device, the
whole model, from any saved layout). Both read a checkpoint with the same flags (`--load`, `--device`,
`--dtype`, the tokenizer flags, which export-hf takes too)."""
from __future__ import annotations

import argparse

from ..config.rules import NON_NEGATIVE, POSITIVE, RULES, check_flags
from ..errors import os_errors_are_user_errors
from ..model.build import DTYPES
from ..tokenizers.base import TYPES as TOKENIZER_TYPES
from .output import emit

# The numeric flags of eval and generate, checked (with NaN/inf) before the checkpoint is read.
EVAL_RULES = {"seq_length": (lambda v: v >= 2, "at least 2 (a window predicts its tokens 2..n)"),
              "micro_batch_size": POSITIVE, "max_tokens": POSITIVE}
GENERATE_RULES = {"max_new_tokens": NON_NEGATIVE, "temperature": NON_NEGATIVE, "top_k": NON_NEGATIVE,
                  "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "seed": RULES["seed"]}   # seed: as train's


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", required=True, help="checkpoint root (uses `latest`) or one iter_XXXXXXX directory")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (auto: the GPU if there is one)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights and compute dtype")
    add_tokenizer_flags(p)


def add_tokenizer_flags(p: argparse.ArgumentParser) -> None:
    """Tokenizer flags of eval/generate/export-hf; given, they replace the checkpoint's tokenizer."""
    p.add_argument("--tokenizer-type", choices=list(TOKENIZER_TYPES), help="tokenizer type (default: the checkpoint's)")
    p.add_argument("--tokenizer-model", help="tokenizer.json (or its directory) / SentencePiece .model")
    p.add_argument("--vocab-file", help="GPT2BPETokenizer vocab.json (default: the checkpoint's)")
    p.add_argument("--merge-file", help="GPT2BPETokenizer merges.txt (default: the checkpoint's)")


def register(sub) -> None:
    p = sub.add_parser("eval", help="loss/perplexity of a checkpoint on a text file or a data split")
    _common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="UTF-8 text, tokenized with the checkpoint's tokenizer")
    src.add_argument("--data-path", help="prefix of Megatron .bin/.idx data")
    p.add_argument("--split", help="with --data-path: train,valid,test weights (default: the checkpoint's)")
    p.add_argument("--eval-split", default="valid", choices=["train", "valid", "test"],
                   help="with --data-path: which split's documents to score")
    p.add_argument("--seq-length", type=int, help="window length (default: the checkpoint's seq length)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens (default: all)")
    p.set_defaults(func=run_eval)
    p = sub.add_parser("generate", help="sample text from a checkpoint (KV cache)")
    _common(p)
    p.add_argument("--prompt", required=True, help="text to continue (tokenized with the checkpoint's tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate at most (a warning when the prompt and these exceed the model's "
                        "context)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (the same seed gives the same text)")
    p.add_argument("--stop-at-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="stop at the tokenizer's end-of-document token")
    p.add_argument("--keep-special-tokens", action="store_true",
                   help="keep special tokens (eod, bos, e.g. <s> and </s>) in the printed text; by default they "
                        "are left out of it (--json's token ids always hold them)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--json", action="store_true",
                   help="print a JSON line (text, completion, token ids, what stopped generation) instead of the "
                        "text")
    p.set_defaults(func=run_generate)


@os_errors_are_user_errors
def run_eval(args: argparse.Namespace) -> int:
    """One JSON line: {loss, ppl, tokens}."""
    from ..inference.generate import evaluate
    check_flags(args, EVAL_RULES)
    emit(evaluate(args.load, device=args.device, dtype=args.dtype, text_file=args.text_file,
                  data_path=args.data_path, split=args.split, eval_split=args.eval_split,
                  seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, max_tokens=args.max_tokens,
                  tokenizer=vars(args)), as_json=True)
    return 0


@os_errors_are_user_errors
def run_generate(args: argparse.Namespace) -> int:
    """The text (prompt and continuation), or with --json one JSON line."""
    from ..inference.generate import generate_text
    check_flags(args, GENERATE_RULES)
    out = generate_text(args.load, args.prompt, device=args.device, dtype=args.dtype,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop_at_eod=args.stop_at_eod,
                        keep_special_tokens=args.keep_special_tokens, use_cache=not args.no_kv_cache,
                        tokenizer=vars(args))
    emit(out, as_json=args.json, text=out["text"])
    return 0
