"""Typed configuration: what settings exist, one dataclass per component.

Each component receives only its own section, so a model never reads optimizer
settings and the schedule never reads model shapes. Field names are Megatron's
flag names with dashes turned into underscores; config/flags.py builds the flags from
these fields, so a new option is added in exactly one place. Here: what
settings exist; values.py: how YAML and flags become them; rules.py: which values a run
accepts (a new numeric setting also needs its range rule there); root.py: `Config`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..tokenizers.base import TYPES as TOKENIZER_TYPES

# The vocabulary size when no tokenizer gives one (mock data, benchmarks): GPT-2's.
DEFAULT_VOCAB_SIZE = 50257


def opt(default: Any, help: str, choices: Optional[list] = None, flag: Optional[str] = None,
        aliases: tuple = (), const_aliases: Optional[dict] = None) -> Any:
    """A dataclass field carrying its CLI help, choices and extra flag aliases.

    `const_aliases` maps a switch to the value it sets (Megatron's `--checkpoint-activations` is
    `--recompute-granularity full`) with the help text to show for it."""
    meta = {"help": help, "choices": choices, "flag": flag, "aliases": aliases,
            "const_aliases": const_aliases or {}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    num_layers: int = opt(4, "number of transformer layers")
    hidden_size: int = opt(64, "transformer hidden size")
    num_attention_heads: int = opt(4, "number of attention heads")
    num_key_value_heads: Optional[int] = opt(
        None, "key/value heads for grouped-query attention (default: = attention heads)",
        aliases=("--num-query-groups",))
    ffn_hidden_size: Optional[int] = opt(None, "MLP hidden size (default 4*hidden, or 8/3*hidden for SwiGLU)")
    seq_length: int = opt(64, "tokens per training sample")
    max_position_embeddings: Optional[int] = opt(None, "learned position table size (default: seq length)")
    vocab_size: Optional[int] = opt(None, "vocabulary size (default: from the tokenizer; "
                                      f"{DEFAULT_VOCAB_SIZE} with mock data)")
    make_vocab_size_divisible_by: int = opt(128, "pad the vocabulary to a multiple of this (times TP)")
    padded_vocab_size: Optional[int] = opt(
        None, "Megatron-DeepSpeed's padded vocabulary: the model has this many vocabulary rows and the loss's "
              "softmax runs over all of them, as Megatron-DeepSpeed's does (set from its checkpoints); default: "
              "the tokenizer's vocabulary, its padding masked out of the loss")
    init_method_std: float = opt(0.02, "std of the normal weight initialisation")
    hidden_dropout: float = opt(0.1, "dropout after attention/MLP and on embeddings")
    attention_dropout: float = opt(0.1, "dropout on attention probabilities")
    use_rotary_position_embeddings: bool = opt(False, "RoPE instead of learned positions",
                                               aliases=("--position-embedding-type-rope",))
    add_position_embedding: Optional[bool] = opt(
        None, "learned absolute position embeddings (default: only without RoPE; Megatron-DeepSpeed adds them "
              "with RoPE too unless --no-position-embedding)",
        const_aliases={"--no-position-embedding": (False, "Megatron's switch: no learned position embeddings")})
    rotary_percent: float = opt(1.0, "fraction of each head's dims that RoPE rotates")
    rotary_base: int = opt(10000, "RoPE base frequency")
    normalization: str = opt("layernorm", "normalization layer", choices=["layernorm", "rmsnorm"])
    layernorm_epsilon: float = opt(1e-5, "epsilon of LayerNorm/RMSNorm")
    swiglu: bool = opt(False, "SwiGLU MLP instead of GeLU")
    gelu_approximation: str = opt(
        "tanh", "GeLU of the MLP: tanh (the approximation of Megatron's fused bias-GeLU kernel and GPT-2) or none "
                "(exact erf)", choices=["tanh", "none"],
        const_aliases={"--no-bias-gelu-fusion": ("none", "Megatron's unfused GeLU, which is the exact (erf) one: "
                                                         "here --gelu-approximation none"),
                       "--openai-gelu": ("tanh", "Megatron's tanh-approximated GeLU: here --gelu-approximation "
                                                 "tanh (the default)")})
    disable_bias_linear: bool = opt(False, "no biases in linear layers")
    untie_embeddings_and_output_weights: bool = opt(False, "separate output head instead of tied embedding")
    recompute_granularity: Optional[str] = opt(
        None, "activation checkpointing: full, selective, or none (the default: every activation kept)",
        choices=["full", "selective"],
        const_aliases={"--checkpoint-activations": ("full", "Megatron's name for --recompute-granularity full"),
                       "--deepspeed-activation-checkpointing": (
                           "full", "DeepSpeed's activation checkpointing: here --recompute-granularity full"),
                       "--no-checkpoint-activations": (None, "no activation recompute, whatever the config says "
                                                             "(--recompute-granularity none)")})
    recompute_num_layers: Optional[int] = opt(None, "with full recompute: layers per stage to recompute (default all)")
    cross_entropy_loss_fusion: bool = opt(False, "fuse the output projection with the loss, chunked over tokens, "
                                                 "so the [tokens x vocab] logits are never stored (less memory, "
                                                 "a little slower)")
    bias_grad_fusion: bool = opt(True, "on CUDA in bf16/fp16, sum fc1's and QKV's bias gradients in the Triton "
                                       "passes that write their gradients (gpt3d/model/bias_grad.py); "
                                       "--no-bias-grad-fusion leaves them to torch's separate sums")
    gemm_tuning: bool = opt(True, "on CUDA in bf16/fp16 with nvmath-python installed (the gpu extra), run the "
                                  "linears' GEMMs through cuBLASLt with the fastest of its candidate algorithms "
                                  "for each shape, the tanh GeLU in their epilogues (gpt3d/model/cublaslt.py); "
                                  "--no-gemm-tuning leaves them to torch; off in --deterministic-mode")
    use_flash_attn: bool = opt(False, "use the flash-attn package if installed (else torch SDPA)")
    no_masked_softmax_fusion: bool = opt(False, "accepted, no effect: gpt3d's attention softmax is SDPA's (or "
                                                "flash-attn's), never Megatron's fused masked-softmax kernel",
                                         flag="--no-masked-softmax-fusion")
    no_bias_dropout_fusion: bool = opt(False, "accepted, no effect: bias, dropout and residual add are plain "
                                              "PyTorch ops (fused by --compile, same values)",
                                       flag="--no-bias-dropout-fusion")
    no_gradient_accumulation_fusion: bool = opt(False, "compute weight gradients apart and add them into the "
                                                       "fp32 gradient buffer afterwards; by default the "
                                                       "weight-gradient GEMMs of all but FP8's linears add into "
                                                       "it themselves (gpt3d/model/grad_accumulation.py)",
                                                flag="--no-gradient-accumulation-fusion")
    no_persist_layer_norm: bool = opt(False, "accepted, no effect: LayerNorm is torch's (no apex persistent "
                                             "kernel)", flag="--no-persist-layer-norm")
    attention_backend: str = opt("auto", "SDPA kernel on GPU (auto: cuDNN on Hopper, else flash)",
                                 choices=["auto", "cudnn", "flash", "efficient", "math"])

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.swiglu:  # keep the parameter count of a 4h GeLU MLP, rounded like Megatron
            return int(4 * self.hidden_size * 2 / 3 / 64) * 64 or 4 * self.hidden_size
        return 4 * self.hidden_size

    @property
    def learned_positions(self) -> bool:
        """Whether the model has a learned position table (--add-position-embedding, else: no RoPE)."""
        if self.add_position_embedding is not None:
            return self.add_position_embedding
        return not self.use_rotary_position_embeddings

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = opt(1, "tensor parallel size", aliases=("--tp",))
    pipeline_model_parallel_size: int = opt(1, "pipeline parallel size", aliases=("--pp",))
    sequence_parallel: bool = opt(False, "split norm/dropout regions along the sequence across TP")
    num_layers_per_virtual_pipeline_stage: Optional[int] = opt(None, "interleaved 1F1B: layers per model chunk "
                                                                         "(default: no interleaving)")
    pipeline_model_parallel_split: Optional[str] = opt(
        None, "explicit layers per stage, comma separated (e.g. 3,5); default even split")
    zero_stage: int = opt(1, "0: data parallel all-reduce; 1: ZeRO-1 sharded optimizer", choices=[0, 1])
    bucket_size_mb: float = opt(40.0, "gradient bucket size for overlapped reduction")
    overlap_grad_reduce: bool = opt(True, "reduce gradient buckets during backward",
                                    flag="--overlap-grad-reduce")
    distributed_backend: str = opt("auto", "torch.distributed backend", choices=["auto", "nccl", "gloo"])
    distributed_timeout_minutes: float = opt(10.0, "collective timeout, so a dead rank ends the job")
    no_pipeline_parallel: bool = opt(False, "Megatron-DeepSpeed: no pipeline engine; needs "
                                            "--pipeline-model-parallel-size 1", flag="--no-pipeline-parallel")
    no_async_tensor_model_parallel_allreduce: bool = opt(
        False, "accepted, no effect: gpt3d's column-parallel backward already all-reduces the input gradient "
               "synchronously (it never overlaps it with the weight-gradient GEMM)",
        flag="--no-async-tensor-model-parallel-allreduce")


@dataclass
class OptimizerConfig:
    weight_decay: float = opt(0.01, "weight decay (not applied to biases and norms)")
    adam_beta1: float = opt(0.9, "Adam beta1")
    adam_beta2: float = opt(0.999, "Adam beta2")
    adam_eps: float = opt(1e-8, "Adam epsilon")
    decoupled_weight_decay: bool = opt(
        True, "AdamW's decoupled weight decay; --no-decoupled-weight-decay: Adam's L2 penalty added to the "
              "gradient, as torch.optim.Adam does (Megatron-DeepSpeed's optimizer where apex is not used, e.g. "
              "on CPU; set from its checkpoints)")
    clip_grad: float = opt(1.0, "global gradient-norm clipping (0 disables)")
    micro_batch_gradients: str = opt(
        "mean", "the gradient a step clips and applies: of the global batch's mean loss, or (sum) the micro-batch "
                "losses' gradients summed, i.e. micro-batches-per-step times that (what DeepSpeed's pipeline "
                "engine does; set from Megatron-DeepSpeed checkpoints written by it)", choices=["mean", "sum"])


@dataclass
class SchedulerConfig:
    lr: float = opt(3e-4, "peak learning rate")
    min_lr: float = opt(0.0, "learning rate at the end of decay")
    lr_decay_style: str = opt("cosine", "decay shape", choices=["cosine", "linear", "constant"])
    lr_warmup_iters: int = opt(0, "linear warm-up iterations")
    lr_warmup_tokens: Optional[int] = opt(None, "linear warm-up in tokens (overrides iterations; "
                                                 "default: --lr-warmup-iters)")
    lr_warmup_fraction: Optional[float] = opt(None, "warm-up as a fraction of the decay length "
                                                      "(default: --lr-warmup-iters)")
    lr_decay_iters: Optional[int] = opt(None, "decay iterations (default: train iters)")
    lr_decay_tokens: Optional[int] = opt(None, "decay length in tokens (makes the schedule token "
                                                "based; default: iteration based)")
    override_opt_param_scheduler: bool = opt(
        False, "accepted, no effect: gpt3d always takes the LR schedule from the flags (checkpoints store no "
               "schedule settings), which is what this flag asks of Megatron", flag="--override-opt_param-scheduler")


@dataclass
class PrecisionConfig:
    bf16: bool = opt(False, "bf16 autocast with fp32 master weights")
    fp16: bool = opt(False, "fp16 params with dynamic loss scaling")
    loss_scale: Optional[float] = opt(None, "static fp16 loss scale (default dynamic)")
    initial_loss_scale: float = opt(2.0 ** 16, "initial dynamic loss scale")
    min_loss_scale: float = opt(1.0, "smallest dynamic loss scale")
    loss_scale_window: int = opt(1000, "good steps before the loss scale grows")
    hysteresis: int = opt(2, "overflows tolerated before the scale drops")
    accumulate_allreduce_grads_in_fp32: bool = opt(True, "fp32 gradient buffers for bf16/fp16 params")
    fp8: bool = opt(False, "FP8 GEMMs in the transformer layers (torchao float8 training, pip install -e "
                           "'.[fp8]'; needs --bf16 and an FP8 GPU such as H100); weights and checkpoints unchanged")
    fp8_recipe: str = opt("tensorwise", "FP8 scaling: tensorwise (E4M3 fwd / E5M2 grads), rowwise, or "
                                        "rowwise_with_gw_hp (weight gradient GEMM in bf16)",
                          choices=["tensorwise", "rowwise", "rowwise_with_gw_hp"])


@dataclass
class DataConfig:
    data_path: list = opt([], "a data prefix, or weighted pairs w1 p1 [w2 p2 ...] (a blend, one pair too)")
    split: str = opt("969,30,1", "train,valid,test split over documents")
    tokenizer_type: str = opt("GPT2BPETokenizer", "tokenizer, by Megatron's name", choices=list(TOKENIZER_TYPES))
    tokenizer_model: Optional[str] = opt(None, "HuggingFaceTokenizer: tokenizer.json (or its directory); "
                                               "SentencePiece types: the .model file")
    vocab_file: Optional[str] = opt(None, "GPT2BPETokenizer: vocab.json")
    merge_file: Optional[str] = opt(None, "GPT2BPETokenizer: merges.txt")
    mock_data: bool = opt(False, "synthetic learnable tokens, no files needed")
    data_impl: str = opt("infer", "indexed dataset format: mmap (Megatron's MMIDIDX .bin/.idx) or infer; "
                                  "Megatron's lazy/cached formats are refused")
    num_workers: int = opt(0, "data loader worker processes")


@dataclass
class TrainingConfig:
    micro_batch_size: int = opt(4, "samples per micro-batch per data-parallel rank")
    global_batch_size: Optional[int] = opt(None, "samples per optimizer step (default: micro batch x DP)")
    train_iters: Optional[int] = opt(None, "optimizer steps (default: from --train-samples or --train-tokens)")
    train_tokens: Optional[int] = opt(None, "stop after this many tokens (default: no token limit)")
    train_samples: Optional[int] = opt(None, "train for this many samples (iterations = samples // global batch); "
                                             "also sizes the sample index, as in Megatron")
    seed: int = opt(1234, "random seed (weights do not depend on the parallel layout)")
    device: str = opt("auto", "where to train", choices=["auto", "cpu", "cuda"])
    eval_interval: int = opt(1000, "iterations between validations")
    eval_iters: int = opt(100, "batches per validation (also sizes the validation/test index, as in Megatron)")
    log_interval: int = opt(10, "iterations between log lines (a ds_config's steps_per_print does not change it)")
    run_name: Optional[str] = opt(None, "this run's name: its directory is runs/<name> (default: the --config file's "
                                        "name without .yaml, else 'train'); a name already taken gets -2, -3, ...")
    run_dir: Optional[str] = opt(None, "this run's directory, used as it is (default: a new runs/<run name>; a "
                                       "resume keeps the directory of the run it resumes)")
    log_file: Optional[str] = opt(None, "JSON-lines metrics file, with a .png of its curves beside it at the end "
                                        "(default: metrics.jsonl in the run directory)")
    tensorboard_dir: Optional[str] = opt(None, "TensorBoard log directory (default: no TensorBoard)")
    tensorboard_queue_size: int = opt(10, "TensorBoard events buffered before a write (Megatron-DeepSpeed uses 1000)")
    log_timers_to_tensorboard: bool = opt(False, "TensorBoard: iteration-time (gpt3d times whole steps only)")
    log_batch_size_to_tensorboard: bool = opt(False, "TensorBoard: global batch size")
    log_validation_ppl_to_tensorboard: bool = opt(False, "TensorBoard: validation perplexity")
    log_optimizer_states_to_tensorboard: bool = opt(
        False, "TensorBoard: L2/L1 norms and max |x| of Adam's moments and the fp32 weights (an extra pass over "
               "the optimizer state every --log-interval)")
    wandb_project: Optional[str] = opt(None, "Weights & Biases project: log the TensorBoard scalars there too "
                                             "(pip install -e '.[wandb]'; WANDB_MODE=offline to keep them local; "
                                             "default: no W&B)")
    wandb_exp_name: Optional[str] = opt(None, "W&B run name (default: the run directory's name)")
    wandb_save_dir: Optional[str] = opt(None, "directory for W&B's local files (default: the run directory)")
    deepspeed: bool = opt(False, "Megatron-DeepSpeed's switch: read --deepspeed_config (gpt3d needs no DeepSpeed)")
    deepspeed_config: Optional[str] = opt(None, "DeepSpeed JSON config: batch sizes, ZeRO stage, fp16/bf16 and "
                                                "loss scaling, clipping (see config/deepspeed.py; default: none)",
                                          flag="--deepspeed_config", aliases=("--deepspeed-config",))
    peak_tflops: Optional[float] = opt(None, "per-device peak for MFU (default: the GPU's bf16 dense peak: H100 and "
                                             "H200 989, A100 312, V100 125; 989 elsewhere)")
    compile: Optional[bool] = opt(None, "torch.compile the model (default: on with CUDA, off on the CPU; "
                                        "--no-compile runs eager)")
    compile_granularity: str = opt(
        "auto", "what one compiled graph covers: chunk (the whole model chunk, embedding to the head's logits: "
                "fusions across layers, compile time grows with the layers), layer (regional: one transformer "
                "layer's body, compiled once and reused by every layer), auto (chunk with TP = DP = 1 and no "
                "FP8, unless dropout is on and a chunk has 16 layers or more; else layer)",
        choices=["auto", "chunk", "layer"])
    exit_duration_in_mins: Optional[float] = opt(None, "save and exit after this many minutes (default: no "
                                                               "limit)")
    exit_signal_handler: bool = opt(True, "SIGTERM/SIGINT: finish the step, save, exit 0")
    max_skipped_steps: int = opt(10, "stop after this many consecutive non-finite steps (fp16: at the minimum "
                                     "loss scale); 0 never stops")
    check_for_nan_in_loss_and_grad: bool = opt(False, "stop at the first non-finite loss/grad (bf16/fp32)")
    check_memory: bool = opt(False, "refuse to start a layout `gpt3d plan` predicts will not fit in GPU memory")
    auto_tune_layout: bool = opt(False, "on a GPU, run the start-up advice: the recompute setting and micro-batch "
                                        "size `gpt3d plan` predicts fastest that fit, same global batch, sample "
                                        "order and math (gpt3d/plan/advice.py)")
    deterministic_mode: bool = opt(
        False, "same command, same GPU(s): identical losses (deterministic algorithms, cuBLAS workspace, NCCL "
               "Ring, flash-attention backward; slower: see benchmarks/deterministic_check.py)",
        flag="--deterministic-mode", aliases=("--deterministic",))


@dataclass
class CheckpointConfig:
    save: Optional[str] = opt(None, "checkpoint directory to write (default: no checkpoints)")
    load: Optional[str] = opt(None, "checkpoint directory to resume from (default: start from scratch)")
    save_interval: Optional[int] = opt(None, "iterations between checkpoints (default: with --save, one at the end "
                                             "of the run only)")
    keep_last: Optional[int] = opt(None, "keep only the newest N checkpoints (default: keep all)")
    no_load_optim: bool = opt(False, "load weights only")
    no_load_rng: bool = opt(False, "do not restore RNG states")
    finetune: bool = opt(False, "load weights, reset iteration/optimizer/data position")
    override_data_state: bool = opt(
        False, "resume even though the data stream changed (data path, split, seq length, global batch, seed, "
               "sample order); the sample position and token count carry over")


SECTIONS = {
    "model": ModelConfig, "parallel": ParallelConfig, "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig, "precision": PrecisionConfig, "data": DataConfig,
    "training": TrainingConfig, "checkpoint": CheckpointConfig,
}


@dataclass
class Sections:
    """Every section of a configuration (the data of `Config`, config/root.py, which adds building and checking)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def non_defaults(self) -> dict:
        """Flat {setting: value} of everything that differs from the defaults: what a run's flags and YAML set."""
        default = type(self)().to_dict()
        return {k: v for sec, values in self.to_dict().items() for k, v in values.items() if default[sec][k] != v}



def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a config field (`num_layers` -> `--num-layers`)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")
