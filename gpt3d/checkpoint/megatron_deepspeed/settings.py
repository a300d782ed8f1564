"""The gpt3d settings a Megatron-DeepSpeed run used, read from its checkpoint (its args, its ds_config, its
optimizer's parameter groups), and what of that run gpt3d cannot continue.

A resumed Megatron-DeepSpeed run keeps the settings its command line omits only where Megatron's defaults
say so; a user moving a run to gpt3d should not have to rediscover them. So `train --load MDS_DIR` takes
every setting the command line (and YAML, and --deepspeed_config) leaves out from the checkpoint: the model
shape and its numerics (GeLU form, learned positions next to RoPE, the padded vocabulary the loss runs
over), the optimizer's update rule and hyperparameters, the LR schedule, the data stream and the batch
sizes. The parallel layout is not taken: it is the new run's choice. Settings given on the command line
win; model shapes that disagree with the checkpoint are refused later, as for gpt3d's own checkpoints.

Features of Megatron-DeepSpeed that gpt3d does not implement (MoE, curriculum learning, post-LN, ...) are
refused here in one line instead of being continued as something else.
"""
from __future__ import annotations

from typing import Any, Optional

from ...errors import CheckpointError
from .names import QKV_BLOCKS, QKV_GROUPED, Shapes
from .source import Checkpoint
from .unpickle import load

# Megatron args that make a model or a data stream gpt3d cannot continue: arg -> (is it set?, what it is)
UNSUPPORTED = {
    "num_experts": (lambda v: any(int(x) > 1 for x in (v if isinstance(v, (list, tuple)) else [v or 1])),
                    "mixture of experts"),
    "apply_layernorm_1p": (bool, "--apply-layernorm-1p"),
    "apply_residual_connection_post_layernorm": (bool, "post-LayerNorm residuals"),
    "squared_relu": (bool, "squared ReLU"),
    "mlp_type": (lambda v: v not in (None, "standard"), "--mlp-type other than standard"),
    "transformer_impl": (lambda v: v not in (None, "local"), "Transformer Engine layers"),
    "reset_position_ids": (bool, "--reset-position-ids"),
    "reset_attention_mask": (bool, "--reset-attention-mask"),
    "eod_mask_loss": (bool, "--eod-mask-loss"),
    "curriculum_learning_legacy": (bool, "curriculum learning"),
    "data_efficiency_curriculum_learning": (bool, "data-efficiency curriculum learning"),
    "random_ltd": (bool, "random layer-token dropping"),
    "rampup_batch_size": (bool, "--rampup-batch-size"),
    "mos": (bool, "mixture of students"), "kd": (bool, "knowledge distillation"),
    "use_alibi_position_embeddings": (bool, "ALiBi"),
}
KNOWN_CHECKPOINT_VERSIONS = (2.0, 3.0)


def refuse_unsupported(ckpt: Checkpoint) -> None:
    a = ckpt.args
    for key, (is_set, what) in UNSUPPORTED.items():
        if is_set(a.get(key)):
            raise CheckpointError(f"{ckpt.dir}: the run uses {what} ({key}={a.get(key)!r}), which gpt3d does not "
                                  "have; it cannot continue this run")
    if a.get("optimizer", "adam") != "adam":
        raise CheckpointError(f"{ckpt.dir}: optimizer {a.get('optimizer')!r}; gpt3d continues Adam runs only")
    heads, kv_ch, hidden = a["num_attention_heads"], a.get("kv_channels"), a["hidden_size"]
    if kv_ch is not None and kv_ch * heads != hidden:
        raise CheckpointError(f"{ckpt.dir}: kv_channels {kv_ch} x {heads} heads != hidden size {hidden}; gpt3d's "
                              "heads are hidden / heads wide")
    if a.get("lr_decay_style", "linear") not in ("cosine", "linear", "constant"):
        raise CheckpointError(f"{ckpt.dir}: --lr-decay-style {a.get('lr_decay_style')}; gpt3d has cosine, linear "
                              "and constant")
    if (a.get("normalization") or "layernorm").lower() not in ("layernorm", "rmsnorm"):
        raise CheckpointError(f"{ckpt.dir}: normalization {a.get('normalization')!r} is not one gpt3d has")


def shapes(ckpt: Checkpoint) -> Shapes:
    """The per-shard head counts and the QKV layout of the checkpoint, or CheckpointError for a layout gpt3d
    does not know. Megatron-DeepSpeed's FPDT change (the commit after 6acc370a, which added the
    --ds-sequence-parallel-fpdt args) moved QKV from per-group [q.., k, v] rows to [all q | all k | all v] per
    TP shard; with grouped-query attention that code splits the shard in equal thirds (or, with DeepSpeed
    sequence parallelism, asserts it has none), which is no consistent layout, so it is refused."""
    a = ckpt.args
    if ckpt.checkpoint_version not in KNOWN_CHECKPOINT_VERSIONS:
        raise CheckpointError(f"{ckpt.dir}: checkpoint_version {ckpt.checkpoint_version!r}; gpt3d knows the QKV "
                              f"layout of versions {', '.join(map(str, KNOWN_CHECKPOINT_VERSIONS))} only")
    heads = a["num_attention_heads"]
    kv = a.get("num_key_value_heads") or heads
    layout = QKV_GROUPED
    if "ds_sequence_parallel_fpdt" in a:
        layout = QKV_BLOCKS
        if kv != heads:
            raise CheckpointError(f"{ckpt.dir}: written after Megatron-DeepSpeed's FPDT change with grouped-query "
                                  f"attention ({heads} heads, {kv} key/value heads): its QKV layout is unknown to "
                                  "gpt3d; refusing to load it")
    if heads % ckpt.tp or kv % ckpt.tp:
        raise CheckpointError(f"{ckpt.dir}: TP {ckpt.tp} does not divide {heads} heads / {kv} key/value heads")
    return Shapes(heads // ckpt.tp, kv // ckpt.tp, a["hidden_size"] // heads, bool(a.get("swiglu")), layout)


def padded_vocab(ckpt: Checkpoint) -> int:
    """Megatron's padded vocabulary: the embedding's rows, every one of them in its loss."""
    v = ckpt.args.get("padded_vocab_size")
    if not v:
        raise CheckpointError(f"{ckpt.dir}: the args record no padded_vocab_size")
    return int(v)


def decoupled_weight_decay(ckpt: Checkpoint) -> Optional[bool]:
    """Adam's update rule as the optimizer recorded it: torch.optim.Adam's groups say `decoupled_weight_decay`
    (False: L2 added to the gradient; Megatron-DeepSpeed uses it where apex is missing, e.g. on CPU);
    apex's and DeepSpeed's FusedAdam record `bias_correction` and run in AdamW mode as Megatron builds them.
    None when no optimizer state is saved."""
    files = [f for s in ckpt.shards for f in s.optim_files.values()]
    if not files:
        return None
    osd = load(files[0]).get("optimizer_state_dict") or {}
    groups = (osd.get("base_optimizer_state") or {}).get("param_groups") or []
    if not groups:
        raise CheckpointError(f"{files[0]}: no optimizer parameter groups")
    g = groups[0]
    if "decoupled_weight_decay" in g:
        return bool(g["decoupled_weight_decay"])
    if "bias_correction" in g:
        return True
    if "foreach" in g:   # torch.optim.Adam from before torch recorded the switch: L2
        return False
    raise CheckpointError(f"{files[0]}: an Adam variant gpt3d does not recognise (group keys "
                          f"{', '.join(sorted(g))})")


def _schedule(a: dict, global_batch: int) -> dict:
    out = {k: a.get(k) for k in ("lr", "min_lr", "lr_decay_style", "lr_warmup_tokens", "lr_decay_tokens",
                                 "lr_warmup_fraction")}
    out["lr_warmup_iters"] = a.get("lr_warmup_iters") or 0
    out["lr_decay_iters"] = a.get("lr_decay_iters")
    for kind in ("warmup", "decay"):   # Megatron's sample-based counts: whole iterations here
        samples = a.get(f"lr_{kind}_samples")
        if samples:
            if samples % global_batch:
                raise CheckpointError(f"--lr-{kind}-samples {samples} is not a whole number of global batches "
                                      f"({global_batch}); gpt3d's schedule counts iterations or tokens")
            out[f"lr_{kind}_iters"] = samples // global_batch
    return out


def settings(ckpt: Checkpoint) -> dict:
    """{gpt3d setting: value} of the run that wrote `ckpt` (None values are left out)."""
    from ...config.deepspeed import deepspeed_settings
    refuse_unsupported(ckpt)
    a = ckpt.args
    norm = (a.get("normalization") or "layernorm").lower()
    recompute = "full" if a.get("checkpoint_activations") or a.get("recompute_granularity") == "full" else \
        a.get("recompute_granularity")
    out: dict[str, Any] = {
        "num_layers": a["num_layers"], "hidden_size": a["hidden_size"],
        "num_attention_heads": a["num_attention_heads"], "num_key_value_heads": a.get("num_key_value_heads"),
        "ffn_hidden_size": a.get("ffn_hidden_size"), "seq_length": a["seq_length"],
        "max_position_embeddings": a.get("max_position_embeddings"),
        "make_vocab_size_divisible_by": a.get("make_vocab_size_divisible_by"), "padded_vocab_size": padded_vocab(ckpt),
        "init_method_std": a.get("init_method_std"), "hidden_dropout": a.get("hidden_dropout"),
        "attention_dropout": a.get("attention_dropout"),
        "use_rotary_position_embeddings": bool(a.get("use_rotary_position_embeddings")),
        "add_position_embedding": bool(a.get("add_position_embedding", True)),
        "rotary_percent": a.get("rotary_percent"), "rotary_base": a.get("rope_theta"), "normalization": norm,
        "layernorm_epsilon": a.get("layernorm_epsilon"), "swiglu": bool(a.get("swiglu")),
        "disable_bias_linear": not a.get("add_bias_linear", True),
        "untie_embeddings_and_output_weights": bool(a.get("untie_embeddings_and_output_weights")),
        # Megatron's GeLU is tanh-approximated when fused (bias_gelu_fusion) or --openai-gelu, else exact (erf)
        "gelu_approximation": "tanh" if a.get("bias_gelu_fusion") or a.get("openai_gelu") else "none",
        "recompute_granularity": recompute,
        "weight_decay": a.get("weight_decay"), "adam_beta1": a.get("adam_beta1"), "adam_beta2": a.get("adam_beta2"),
        "adam_eps": a.get("adam_eps"), "decoupled_weight_decay": decoupled_weight_decay(ckpt),
        # DeepSpeed's pipeline engine sums the micro-batches' gradients instead of averaging them (measured on
        # the reference checkpoints, DeepSpeed 0.16.2; DeepSpeed issue #7773)
        "micro_batch_gradients": "sum" if ckpt.pipeline else "mean",
        "fp16": bool(a.get("fp16")), "bf16": bool(a.get("bf16")),
        "data_path": a.get("data_path"), "split": a.get("split"), "tokenizer_type": a.get("tokenizer_type"),
        "vocab_file": a.get("vocab_file"), "merge_file": a.get("merge_file"),
        "tokenizer_model": a.get("tokenizer_model"),
        "vocab_size": a.get("vocab_size") if a.get("tokenizer_type") == "NullTokenizer" else None,
        "micro_batch_size": a.get("micro_batch_size"), "global_batch_size": a.get("global_batch_size"),
        "train_iters": a.get("train_iters"), "train_samples": a.get("train_samples"),
        "train_tokens": a.get("train_tokens"), "seed": a.get("seed"), "eval_interval": a.get("eval_interval"),
        "eval_iters": a.get("eval_iters"), "log_interval": a.get("log_interval"),
        "save_interval": a.get("save_interval"),
    }
    out.update(_schedule(a, a.get("global_batch_size") or 1))
    if ckpt.ds_config:   # what DeepSpeed itself applied: clipping, ZeRO stage, loss scaling, batch sizes
        for name, value, _ in deepspeed_settings(ckpt.ds_config, f"{ckpt.dir} (its ds_config)",
                                                 a.get("micro_batch_size") or 1, ckpt.dp):
            out[name] = value
    if out["train_iters"] is not None:
        out.pop("train_samples")
    return {k: v for k, v in out.items() if v is not None}
