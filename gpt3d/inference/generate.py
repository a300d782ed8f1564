"""`gpt3d eval` and `gpt3d generate`: one process, the whole model at TP=PP=1, from any saved layout.

Evaluation uses the training loss path (the same cross entropy, padded vocabulary masked), so its numbers
are the ones training reports; generation decodes with the model's KV cache.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..checkpoint import read_model_tensors
from ..config import Config
from ..tokenizers.factory import tokenizer_for_checkpoint
from ..errors import ConfigError, DataError, warn
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


TOKENIZER_FLAGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")


def tokenizer_for(cfg: Config, meta: dict, load: str, flags: Optional[dict] = None):
    """The tokenizer of the checkpoint under `load` (its carried copy or recorded settings), with `flags`
    (TOKENIZER_FLAGS -> value or None; other keys are ignored) on top."""
    import dataclasses

    from ..checkpoint import resolve
    flags = {k: (flags or {}).get(k) for k in TOKENIZER_FLAGS}
    manifest = meta.get("tokenizer")
    return tokenizer_for_checkpoint(dataclasses.asdict(cfg.data), meta["vocab_size"], flags,
                                    resolve(load) if manifest else None, manifest)


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


def evaluate(load: str, *, device: str = "auto", dtype: str = "fp32", text_file: Optional[str] = None,
             data_path: Optional[str] = None, split: Optional[str] = None, eval_split: str = "valid",
             seq_length: Optional[int] = None, micro_batch_size: int = 8, max_tokens: Optional[int] = None,
             tokenizer: Optional[dict] = None) -> dict:
    """`gpt3d eval`: {loss, ppl, tokens} of the checkpoint under `load` on `text_file` (tokenized with its
    tokenizer, `tokenizer` flags on top) or on one split (`eval_split`) of the .bin/.idx data at `data_path`."""
    model, cfg, meta = load_model(load, pick_device(device), DTYPES[dtype])
    seq = seq_length or cfg.model.seq_length
    if cfg.model.learned_positions and seq > cfg.model.max_positions:
        raise ConfigError(f"--seq-length {seq} exceeds the model's {cfg.model.max_positions} positions")
    if text_file:
        from ..data.corpus import utf8_text
        with open(text_file, "rb") as fh:
            text = utf8_text(fh.read(), text_file)
        ids = torch.tensor(tokenizer_for(cfg, meta, load, tokenizer).encode(text), dtype=torch.long)
    else:
        ids = _split_tokens(data_path, split or cfg.data.split, eval_split, meta["vocab_size"])
    if max_tokens:
        ids = ids[:max_tokens]
    total, count = score_tokens(model, ids, seq, micro_batch_size, progress=True)
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


def generate_text(load: str, prompt: str, *, device: str = "auto", dtype: str = "fp32", max_new_tokens: int = 64,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = 1234,
                  stop_at_eod: bool = True, keep_special_tokens: bool = False, use_cache: bool = True,
                  tokenizer: Optional[dict] = None) -> dict:
    """`gpt3d generate`: {text, completion, tokens (the new ids), stopped_by} of the checkpoint under `load`
    continuing `prompt` (tokenized with its tokenizer, `tokenizer` flags on top); a warning when the prompt and
    `max_new_tokens` go beyond the model's context."""
    model, cfg, meta = load_model(load, pick_device(device), DTYPES[dtype])
    tok = tokenizer_for(cfg, meta, load, tokenizer)
    ids = tok.encode(prompt) or [tok.require_eod()]
    limit = position_limit(model)
    if limit is not None and len(ids) >= limit:
        raise ConfigError(f"the prompt has {len(ids)} tokens; the model has {limit} positions")
    note = context_warning(model, len(ids), max_new_tokens)
    if note:
        warn(note)
    why: list = []
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   use_cache=use_cache, stop_token=tok.eod if stop_at_eod else None, progress=True, why=why)
    keep = keep_special_tokens
    return {"text": tok.decode_text(out, keep), "completion": tok.decode_text(out[len(ids):], keep),
            "tokens": out[len(ids):], "stopped_by": why[0]}
