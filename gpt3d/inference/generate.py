"""`gpt3d eval` and `gpt3d generate`: one process, the whole model at TP=PP=1, from any saved layout.

Evaluation uses the training loss path (the same cross entropy, padded vocabulary masked), so its numbers
are the ones training reports; generation decodes with the model's KV cache.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Optional

import numpy as np
import torch

from ..checkpoint import read_model_tensors
from ..config import Config
from ..config.rules import NON_NEGATIVE, POSITIVE, RULES, check_flags
from ..tokenizers.base import TYPES as TOKENIZER_TYPES
from ..tokenizers.factory import tokenizer_for_checkpoint
from ..errors import ConfigError, DataError, os_errors_are_user_errors, warn
from ..model.attention import KVCache, sdpa_backend_context
from ..model.build import DTYPES, build_inference_model
from ..model.gpt import GPTModel
from ..parallel.state import pick_device
from ..console.progress import Progress


def load_model(root: str, device: torch.device = torch.device("cpu"),
               dtype: torch.dtype = torch.float32) -> tuple[GPTModel, Config, dict]:
    """(model in eval mode, its config, checkpoint meta); dropout and recompute are off."""
    path, meta, tensors = read_model_tensors(root)
    cfg = Config.from_dict(meta["config"])
    model = build_inference_model(cfg.model, meta["vocab_size"], tensors, device, dtype, seed=cfg.training.seed)
    return model, cfg, meta


def _attention_kernels(model: GPTModel):
    return sdpa_backend_context(model.cfg.attention_backend, next(model.parameters()).device)


def tokenizer_for(cfg: Config, meta: dict, args: argparse.Namespace):
    """The checkpoint's tokenizer (its carried copy or recorded settings), tokenizer flags on top."""
    import dataclasses

    from ..checkpoint import resolve
    flags = {k: getattr(args, k, None) for k in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")}
    manifest = meta.get("tokenizer")
    return tokenizer_for_checkpoint(dataclasses.asdict(cfg.data), meta["vocab_size"], flags,
                                    resolve(args.load) if manifest else None, manifest)


@torch.no_grad()
def score_tokens(model: GPTModel, ids: torch.Tensor, seq_length: int, batch_size: int = 8,
                 progress: bool = False) -> tuple[float, int]:
    """(summed loss, predicted tokens) over non-overlapping windows of `seq_length` tokens of `ids`;
    each window predicts its tokens 2..n from the ones before (the last, shorter window too). `progress`:
    report the tokens scored on stderr (gpt3d/console/progress.py)."""
    device = next(model.parameters()).device
    windows = [ids[i:i + seq_length] for i in range(0, len(ids), seq_length)]
    windows = [w for w in windows if len(w) >= 2]
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    full = [w for w in windows if len(w) == seq_length]
    groups = [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
    groups += [w[None] for w in windows if len(w) != seq_length]
    with _attention_kernels(model), Progress("eval", len(ids), "tokens", enabled=progress) as bar:
        for x in groups:
            x = x.to(device)
            loss = model(x[:, :-1], x[:, 1:])                 # [b, s-1] per-token loss
            total += loss.double().sum()
            count += loss.numel()
            bar.update(x.numel())
    return float(total), count


def _split_tokens(prefix: str, split: str, which: str, vocab_size: int) -> torch.Tensor:
    """All tokens of one split's documents, in document order (every id must fit the model's vocabulary)."""
    from ..data.gpt_dataset import get_split_ranges
    from ..data.indexed import MMapIndexedDataset
    from ..tokenizers.vocab_check import check_token_ids
    data = MMapIndexedDataset(prefix)
    lo, hi = get_split_ranges(split, len(data))[("train", "valid", "test").index(which)]
    if hi <= lo:
        raise DataError(f"{prefix}: the {which} split of '{split}' has no documents")
    check_token_ids(data, lo, hi, vocab_size)
    return torch.from_numpy(np.concatenate([data.get(i) for i in range(lo, hi)]).astype(np.int64))


# The numeric flags of eval and generate, checked (with NaN/inf) before the checkpoint is read.
EVAL_RULES = {"seq_length": (lambda v: v >= 2, "at least 2 (a window predicts its tokens 2..n)"),
              "micro_batch_size": POSITIVE, "max_tokens": POSITIVE}
GENERATE_RULES = {"max_new_tokens": NON_NEGATIVE, "temperature": NON_NEGATIVE, "top_k": NON_NEGATIVE,
                  "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "seed": RULES["seed"]}   # seed: as train's


def evaluate(args: argparse.Namespace) -> dict:
    check_flags(args, EVAL_RULES)
    model, cfg, meta = load_model(args.load, pick_device(args.device), DTYPES[args.dtype])
    seq = args.seq_length or cfg.model.seq_length
    if cfg.model.learned_positions and seq > cfg.model.max_positions:
        raise ConfigError(f"--seq-length {seq} exceeds the model's {cfg.model.max_positions} positions")
    if args.text_file:
        from ..data.corpus import utf8_text
        with open(args.text_file, "rb") as fh:
            text = utf8_text(fh.read(), args.text_file)
        ids = torch.tensor(tokenizer_for(cfg, meta, args).encode(text), dtype=torch.long)
    else:
        ids = _split_tokens(args.data_path, args.split or cfg.data.split, args.eval_split, meta["vocab_size"])
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    total, count = score_tokens(model, ids, seq, args.micro_batch_size, progress=True)
    if count == 0:
        raise DataError("fewer than 2 tokens to score")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}


# ----- generation -------------------------------------------------------------------------------------------------
def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> int:
    """logits [V] (fp32) -> next token; temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    # Shifted so the top logit is 0 and in float64, so no positive temperature, however small, overflows to
    # inf - inf (NaN probabilities): the others go to -inf, which is greedy.
    logits = (logits - logits.max()).double() / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p      # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def position_limit(model: GPTModel) -> Optional[int]:
    """The most tokens (prompt + generated) the model can take: its learned position table; None without one."""
    return model.cfg.max_positions if model.cfg.learned_positions else None


def context_warning(model: GPTModel, prompt_tokens: int, max_new_tokens: int) -> Optional[str]:
    """What a generate request beyond the model's context gets (None if it fits): with learned positions the
    output stops at the last position; with RoPE it goes on past the length the model was trained on."""
    want, limit, trained = prompt_tokens + max_new_tokens, position_limit(model), model.cfg.seq_length
    if limit is not None and want > limit:
        return (f"the prompt ({prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} exceed the model's "
                f"{limit} positions: at most {limit - prompt_tokens} new tokens will be generated")
    if limit is None and want > trained:
        return (f"the prompt ({prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} go past the "
                f"{trained} tokens the model was trained on (--seq-length): tokens beyond them are generated "
                "from positions it never saw")
    return None


@torch.no_grad()
def generate(model: GPTModel, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: Optional[int] = None, use_cache: bool = True,
             stop_token: Optional[int] = None, progress: bool = False, why: Optional[list] = None) -> list[int]:
    """Prompt + new tokens. With `use_cache` each step feeds only the newest token; without, the whole
    sequence is recomputed every step (the reference the cache is tested against). `why`, if given, gets
    why generation stopped appended: "max_new_tokens", "eod" or "context" (the learned positions ran out)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    limit = position_limit(model)
    ids = list(prompt)
    cache = KVCache() if use_cache else None
    feed = ids
    reason = "max_new_tokens"
    with _attention_kernels(model), Progress("generate", max_new_tokens, "tokens", enabled=progress) as bar:
        for _ in range(max_new_tokens):
            if limit is not None and len(ids) >= limit:
                reason = "context"
                break
            x = torch.tensor([feed if use_cache else ids], dtype=torch.long, device=device)
            logits = model(x, kv_cache=cache)[0, -1, :model.vocab_size].float()
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            ids.append(nxt)
            feed = [nxt]
            bar.update()
            if stop_token is not None and nxt == stop_token:
                reason = "eod"
                break
    if why is not None:
        why.append(reason)
    return ids


def _generate_cmd(args: argparse.Namespace) -> dict:
    check_flags(args, GENERATE_RULES)
    model, cfg, meta = load_model(args.load, pick_device(args.device), DTYPES[args.dtype])
    tok = tokenizer_for(cfg, meta, args)
    prompt = tok.encode(args.prompt) or [tok.require_eod()]
    limit = position_limit(model)
    if limit is not None and len(prompt) >= limit:
        raise ConfigError(f"the prompt has {len(prompt)} tokens; the model has {limit} positions")
    note = context_warning(model, len(prompt), args.max_new_tokens)
    if note:
        warn(note)
    why: list = []
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, use_cache=not args.no_kv_cache,
                   stop_token=tok.eod if args.stop_at_eod else None, progress=True, why=why)
    keep = args.keep_special_tokens
    return {"text": tok.decode_text(out, keep), "completion": tok.decode_text(out[len(prompt):], keep),
            "tokens": out[len(prompt):], "stopped_by": why[0]}


# ----- CLI --------------------------------------------------------------------------------------------------------
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
    p.set_defaults(func=lambda a: _run(evaluate, a))
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
    p.set_defaults(func=lambda a: _run(_generate_cmd, a))


@os_errors_are_user_errors
def _run(fn, args: argparse.Namespace) -> int:
    out = fn(args)
    if fn is _generate_cmd and not args.json:
        print(out["text"])
    else:
        print(json.dumps(out))
    return 0
