"""Which values a run accepts: every setting's range (RULES), then the rules between settings.

Its own module because it is policy over the settings, not their definition: schema.py says which settings
exist (types, defaults, help), values.py and flags.py how YAML and flags become them; this module says which values and
combinations `gpt3d train` (and every layout `gpt3d plan` proposes) accepts, so a bad run fails in its first
second with one line naming the flag. `Config.validate` calls `validate`. The rules of the parallel layout
(world size, TP/PP/VP divisibility, micro-batches, pipeline split) live in parallel/layout.py: `validate`
resolves the layout through it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from .schema import SECTIONS, ModelConfig, Sections, flag_name
from ..data.sizing import train_iterations, train_valid_test_num_samples
from ..errors import ConfigError
from ..parallel.layout import resolve


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# Value rules by field name: (test, what the value must be). Optional fields may also be None (unset).
# Commands' own numeric flags (eval, generate, plan) use the same rules through `check_flags`.
POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "positive"), (lambda v: v >= 0, "non-negative")
INT64 = 2 ** 63   # counts become numpy/torch int64 (sample indices, token counters, tensor sizes)
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
RULES = {
    **dict.fromkeys(["num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                     "tensor_model_parallel_size", "pipeline_model_parallel_size", "log_interval", "eval_interval",
                     "num_key_value_heads", "ffn_hidden_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by", "padded_vocab_size", "rotary_base", "recompute_num_layers",
                     "num_layers_per_virtual_pipeline_stage", "global_batch_size", "train_iters", "train_tokens",
                     "train_samples", "tensorboard_queue_size",
                     "lr_decay_iters", "lr_decay_tokens", "loss_scale_window", "hysteresis", "save_interval",
                     "keep_last", "adam_eps", "layernorm_epsilon", "init_method_std", "loss_scale",
                     "initial_loss_scale", "min_loss_scale", "peak_tflops"], POSITIVE),
    **dict.fromkeys(["eval_iters", "lr_warmup_iters", "lr_warmup_tokens", "max_skipped_steps",
                     "lr", "min_lr", "weight_decay", "clip_grad", "exit_duration_in_mins"], NON_NEGATIVE),
    **dict.fromkeys(["hidden_dropout", "attention_dropout", "adam_beta1", "adam_beta2"], _FRACTION),
    "rotary_percent": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "lr_warmup_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "seed": (lambda v: 0 <= v < 2 ** 31, "in [0, 2^31)"),
    "num_workers": (lambda v: 0 <= v <= 1024, "in [0, 1024]"),   # processes: more is a fork bomb, not a loader
    # buckets are counted in int64 elements; a 1 TiB bucket is already one bucket for any model
    "bucket_size_mb": (lambda v: 0 < v <= 2 ** 20, "in (0, 1048576] (MiB)"),
    # every wait's deadline and the watchdog's (train/watchdog.py): 6 s to about two years
    "distributed_timeout_minutes": (lambda v: 0.1 <= v <= 1e6, "in [0.1, 1000000]"),
    # Token ids are int32 in the .bin data (Megatron's format: uint16 below 65,500 ids, else int32), so no id
    # can reach 2^31. A vocabulary that fits this rule but not in memory is refused in model/build.py.
    "vocab_size": (lambda v: 0 < v < 2 ** 31, "in [1, 2^31) (token ids are int32 in the .bin data)"),
}


def check_value(flag: str, v: Any, rule: Optional[tuple] = None) -> None:
    """One number: finite (NaN/inf fail whatever the rule), then `rule` (test, what it must be) if any, then
    within int64 for an int. None (unset) and non-numbers pass."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    _need(not isinstance(v, float) or math.isfinite(v), f"{flag} must be a finite number, got {v}")
    if rule:
        _need(rule[0](v), f"{flag} must be {rule[1]}, got {v}")
    _need(not isinstance(v, int) or -INT64 <= v < INT64, f"{flag} must fit in an int64 (below 2^63), got {v}")


def check_flags(args: Any, rules: dict) -> None:
    """A command's own numeric flags, by argparse dest: each value (each item of a list) through `check_value`
    with its rule, so they fail as config settings do: one ConfigError naming the flag, before any work."""
    for name, rule in rules.items():
        v = getattr(args, name, None)
        for x in v if isinstance(v, list) else [v]:
            check_value("--" + name.replace("_", "-"), x, rule)


def check_values(cfg: Sections) -> None:
    """Choices (YAML bypasses argparse's), every number finite (NaN/inf fail here, whatever the field, including
    ones added later), then RULES."""
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            v, choices = getattr(getattr(cfg, section), f.name), f.metadata.get("choices")
            _need(v is None or not choices or v in choices, f"{flag_name(f)} must be one of {choices}, got {v!r}")
            check_value(flag_name(f), v, RULES.get(f.name))


def check_model(m: ModelConfig) -> None:
    """The rules between model settings (after `check_values`): what any model, trained, saved or imported,
    must satisfy to be built."""
    _need(m.hidden_size % m.num_attention_heads == 0,
          f"--num-attention-heads ({m.num_attention_heads}) must divide --hidden-size ({m.hidden_size})")
    _need(m.num_attention_heads % m.kv_heads == 0,
          f"--num-key-value-heads ({m.kv_heads}) must divide --num-attention-heads ({m.num_attention_heads})")
    _need(m.seq_length <= m.max_positions or not m.learned_positions,
          f"--seq-length ({m.seq_length}) exceeds --max-position-embeddings ({m.max_positions})")
    if m.use_rotary_position_embeddings:
        rot = int(m.head_dim * m.rotary_percent)
        _need(rot >= 2 and rot % 2 == 0, f"rotary dims (head dim {m.head_dim} x {m.rotary_percent}) must be even")


def validate(cfg: Sections, world_size: int) -> None:
    """Check every value and cross-field rule up front so a bad run fails in its first second."""
    m, t, s, pr = cfg.model, cfg.training, cfg.scheduler, cfg.precision
    check_values(cfg)
    check_model(m)
    gbs = resolve(cfg, world_size).global_batch   # every layout rule (parallel/layout.py)
    _need(pr.accumulate_allreduce_grads_in_fp32,
          "--no-accumulate-allreduce-grads-in-fp32 is not supported: gradients are always accumulated and "
          "reduced in fp32 (the fp32 master weights step on them)")
    _need(t.train_iters is not None or t.train_tokens is not None or t.train_samples is not None,
          "give --train-iters, --train-samples or --train-tokens")
    _need(t.train_iters is None or t.train_samples is None, "--train-iters and --train-samples are exclusive")
    iters = train_iterations(t.train_iters, t.train_samples, t.train_tokens, gbs, m.seq_length)
    _need(iters > 0, f"--train-samples {t.train_samples} is less than one global batch ({gbs} samples): the run would "
          "do no iteration")
    counts = train_valid_test_num_samples(iters, t.train_samples, gbs, t.eval_interval, t.eval_iters)
    _need(max(counts) * (m.seq_length + 1) < INT64,
          f"the run's sample counts (train, validation, test: {', '.join(f'{n:,}' for n in counts)}) of "
          f"{m.seq_length + 1} tokens each exceed 2^63 tokens (check --train-iters/--train-samples, "
          "--global-batch-size, --eval-iters)")
    _need(not (pr.bf16 and pr.fp16), "--bf16 and --fp16 are exclusive")
    _need(not t.deterministic_mode or m.attention_backend in ("auto", "flash", "math"),
          f"--attention-backend {m.attention_backend} has no deterministic backward: --deterministic-mode takes "
          "auto, flash or math")
    _need(not pr.fp8 or pr.bf16, "--fp8 needs --bf16 (the FP8 GEMMs take bf16 weights and activations)")
    _need(s.min_lr <= s.lr, f"need 0 <= --min-lr ({s.min_lr}) <= --lr ({s.lr})")
    _need(pr.min_loss_scale <= pr.initial_loss_scale,
          f"--min-loss-scale ({pr.min_loss_scale}) must not exceed --initial-loss-scale ({pr.initial_loss_scale})")
    d = cfg.data
    _need(d.data_impl in ("mmap", "infer"),
          f"--data-impl {d.data_impl} is not supported: gpt3d reads Megatron's mmap .bin/.idx format only "
          "(--data-impl mmap or infer)")
    parts = d.split.replace("/", ",").split(",")
    try:
        vals = [float(x) for x in parts]
    except ValueError:
        raise ConfigError(f"--split '{d.split}' must be numbers like 949,50,1") from None
    _need(all(math.isfinite(v) and v >= 0 for v in vals) and sum(vals) > 0 and len(vals) <= 3,
          f"bad --split '{d.split}'")
    if not d.mock_data:
        _need(vals[0] > 0, f"--split '{d.split}' gives training no documents (its first part is 0)")
        _need(bool(d.data_path), "give --data-path (or --mock-data for synthetic tokens)")
        if d.tokenizer_type == "GPT2BPETokenizer":
            _need(bool(d.vocab_file) and bool(d.merge_file), "--data-path needs --vocab-file and --merge-file")
        elif d.tokenizer_type == "NullTokenizer":
            _need(bool(cfg.model.vocab_size), "--tokenizer-type NullTokenizer needs --vocab-size")
        else:
            _need(bool(d.tokenizer_model), f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")
