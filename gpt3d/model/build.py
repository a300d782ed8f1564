"""Building the model a process runs: this rank's pipeline chunks for training, or the whole model on one
device for inference, with the parameter dtype and the compile policy.

Training and the one-device commands (eval, generate, export, import) build through here, so the dtype
names, the weight init, the FP8 switch and the compile rule exist once. Recompute is the model's own setting
(`recompute_granularity`, read by GPTModel and attention); inference builds with it off and dropout at 0.
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from ..config import Config, ModelConfig, PrecisionConfig, TrainingConfig
from ..errors import ConfigError
from ..parallel.cross_entropy import keep_loss_out_of_graphs
from ..parallel.layers import full_shape
from ..parallel.layout import padded_vocab_size, stage_layers
from ..parallel.param_meta import param_meta
from ..parallel.random import TPRNG
from ..parallel.precision import full_dtype
from ..parallel.state import ParallelState
from .bias_grad import bias_grad_fusion_applies, enable_bias_grad_fusion
from .cublaslt import cublaslt_applies, enable_cublaslt
from .fp8 import enable_fp8, uses_fp8
from .grad_accumulation import enable_grad_accumulation_fusion
from .gpt import GPTModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def param_dtype(cfg: PrecisionConfig) -> torch.dtype:
    """bf16 / fp16 as asked; otherwise full precision (float32, or float64 in the exact layout tests)."""
    return DTYPES["bf16"] if cfg.bf16 else DTYPES["fp16"] if cfg.fp16 else full_dtype()


class ModelChunks:
    """This rank's model chunks (one, or several with the interleaved schedule) as one stateful object.

    The state is every parameter's local shard under its global name, so a checkpoint can store it at one
    layout and load it at another; `layout()` says how each parameter is split across TP.
    """

    def __init__(self, chunks: list[GPTModel]):
        self.chunks, self.ps = chunks, chunks[0].ps

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> GPTModel:
        return self.chunks[i]

    @property
    def vocab_size(self) -> int:
        return self.chunks[0].vocab_size

    @property
    def padded_vocab(self) -> int:
        return self.chunks[0].padded_vocab

    def train(self, mode: bool = True) -> ModelChunks:
        """Every chunk (and all its modules) to `mode`; a chunk already there is left alone: Module.train walks
        every module, a host cost a small training step notices, and only these calls change the mode."""
        for c in self.chunks:
            if c.training != mode:
                c.train(mode)
        return self

    def named_parameters(self):
        for c in self.chunks:
            yield from c.named_parameters()

    def state_dict(self) -> dict:
        """{global name: this rank's shard} (the live parameters, detached)."""
        return {n: p.detach() for n, p in self.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Every parameter from `state` (this rank's shards, any dtype/device)."""
        for n, p in self.named_parameters():
            p.copy_(state[n].to(p.device, p.dtype))

    def layout(self) -> dict:
        """{global name: {"shape": full shape, "split_dim": TP split dim or None, "tied_to": name or None}}."""
        return {n: {"shape": list(full_shape(p, self.ps.tp)), "split_dim": param_meta(p).split_dim,
                    "tied_to": param_meta(p).tied_to} for n, p in self.named_parameters()}


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory of `device` (a GPU's total, the host's physical memory for the CPU), None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AssertionError):
        pass
    return None


def refuse_a_vocabulary_beyond_memory(cfg: Config, ps: ParallelState, vocab_size: int) -> None:
    """ConfigError, before anything is allocated, when one tensor-parallel shard of the vocabulary's embedding,
    built in fp32 whatever the parameter dtype, is larger than the device's whole memory: it could never be
    allocated (an out-of-memory traceback otherwise). The same verdict on every rank of a job of one kind of
    device, so no rank waits for one that gave up."""
    m = cfg.model
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, ps.tp)
    need, have = padded // ps.tp * m.hidden_size * 4, device_memory(ps.device)
    if have is not None and need > have:
        raise ConfigError(f"a vocabulary of {vocab_size:,} ids (padded to {padded:,}) does not fit: its embedding "
                          f"alone is {padded // ps.tp:,} x {m.hidden_size} fp32 = {need / 2 ** 30:,.1f} GiB per "
                          f"tensor-parallel rank, more than the {have / 2 ** 30:,.1f} GiB of {ps.device.type} "
                          "memory (check --vocab-size and --make-vocab-size-divisible-by)")


def build_model_chunks(cfg: Config, ps: ParallelState, tp_rng: TPRNG, vocab_size: int) -> ModelChunks:
    """This rank's pipeline stage, initialised (layout-independent weights), with --fp8 its TP linears' GEMMs
    in float8 (model/fp8.py), the remaining biased linears' bias gradients fused where that applies
    (model/bias_grad.py), the other GEMMs through cuBLASLt where `gemm_tuning` says (model/cublaslt.py), the
    weight gradients of all but FP8's added into the gradient buffer by their GEMMs (model/grad_accumulation.py,
    unless --no-gradient-accumulation-fusion), cast and compiled (`compile_enabled`)."""
    refuse_a_vocabulary_beyond_memory(cfg, ps, vocab_size)
    p = cfg.parallel
    lt = gemm_tuning(cfg, ps.device)
    chunks = []
    layer_groups = stage_layers(cfg.model.num_layers, ps.pp, ps.pp_rank, p.pipeline_model_parallel_split,
                                p.num_layers_per_virtual_pipeline_stage)
    for v, ids in enumerate(layer_groups):
        first = ps.is_first_stage and v == 0
        last = ps.is_last_stage and v == len(layer_groups) - 1
        m = GPTModel(cfg.model, ps, tp_rng, vocab_size=vocab_size, layer_ids=ids, pre_process=first,
                     post_process=last)
        m.init_weights(cfg.training.seed)
        if cfg.precision.fp8:   # FP8 GEMMs in the TP linears; parameters (names, dtypes) unchanged
            enable_fp8(m, cfg.precision.fp8_recipe, ps.device)
        if cfg.model.bias_grad_fusion and bias_grad_fusion_applies(ps.device, param_dtype(cfg.precision)):
            # after FP8, whose linears it skips
            enable_bias_grad_fusion(m, lt)
        if lt:   # the linears that neither FP8 nor the fused functions took
            enable_cublaslt(m)
        if not cfg.model.no_gradient_accumulation_fusion:   # last: it asks each GEMM function whether it can
            enable_grad_accumulation_fusion(m)
        chunks.append(m.cast_parameters(param_dtype(cfg.precision)))
    if compile_enabled(cfg.training, ps.device):
        compile_chunks(chunks, ps, cfg.training.compile_granularity)
    return ModelChunks(chunks)


def gemm_tuning(cfg: Config, device: torch.device) -> bool:
    """Whether the GEMMs run through model/cublaslt.py: --gemm-tuning (the default) where it applies, and never
    in --deterministic-mode (the algorithm chosen by timing may differ between runs)."""
    return _tuning_asked(cfg) and cublaslt_applies(device, param_dtype(cfg.precision))


def _tuning_asked(cfg: Config) -> bool:
    return cfg.model.gemm_tuning and not cfg.training.deterministic_mode


def gelu_epilogues(cfg: Config) -> bool:
    """Whether a CUDA run of `cfg` with the gpu extra gives its MLPs the GeLU in GEMM epilogues (the forward's
    always, GeLU' where that times faster): the switches build_model_chunks reads (bias-gradient fusion, GEMM
    tuning, no deterministic mode, bf16 or fp16, no FP8 — with --fp8, MLPs whose dims FP8 cannot take would have
    them too, which this does not count) and an MLP model/bias_grad.py's fused function takes with the tanh GeLU
    (biased, not SwiGLU). For the planner, which cannot see the training machine's GPU."""
    m = cfg.model
    return (m.bias_grad_fusion and _tuning_asked(cfg) and not cfg.precision.fp8
            and param_dtype(cfg.precision) in (torch.bfloat16, torch.float16) and not m.swiglu
            and not m.disable_bias_linear and m.gelu_approximation == "tanh")


def compile_enabled(t: TrainingConfig, device: torch.device) -> bool:
    """--compile / --no-compile as given; unset, compiled on CUDA (the fast path) and eager on the CPU (where
    compiling costs more than a short run gains)."""
    return t.compile if t.compile is not None else device.type == "cuda"


# auto's depth from which a chunk with dropout compiles per layer (measurements: compile_granularity's docstring)
REGIONAL_FROM_LAYERS = 16


def compile_granularity(granularity: str, tp: int, dp: int, layers: int = 0, dropout: bool = False,
                        fp8: bool = False) -> str:
    """`chunk` or `layer` for --compile-granularity, given the deepest chunk's `layers`, whether any dropout
    is on and whether the linears run FP8 GEMMs. `auto`: `layer` with TP or DP > 1, with FP8, and for a chunk
    of REGIONAL_FROM_LAYERS layers or more with dropout; else `chunk`. Measured on one H100 (benchmarks/
    RESULTS.md): at 125M (12 layers) the whole chunk runs 1.7-1.8% faster with 2.6-2.9 GiB less than
    per-layer graphs, dropout on or off, and compiles in under a minute (48 s with dropout); at the Llama
    shape (16 layers) with dropout 0.1 per-layer graphs run as fast (53,721 against 53,237 tok/s) with 1.2 GiB
    more, and the first step takes 28 s against 103 s (2026-12-06; with attention dropout alone per layer may
    cost ~1%, measured only across calls); at 1.3B (24 layers) with dropout the whole chunk runs no faster,
    holds 6.8 GiB more and its first step takes 75 s against 11.5 s; without dropout it holds 1.4 GiB less
    and compiles in 40 s. With FP8 the per-layer first step is 33-34 s at 1.3B and 31-34 s at the Llama shape,
    where the whole chunk's took 96-216 s (115.6 s at 1.3B, for +0.8% speed, 2026-12-06)."""
    if granularity != "auto":
        return granularity
    if tp > 1 or dp > 1 or fp8 or (dropout and layers >= REGIONAL_FROM_LAYERS):
        return "layer"
    return "chunk"


def compile_chunks(chunks: list[GPTModel], ps: ParallelState, granularity: str = "auto", **options) -> None:
    """torch.compile in place (`Module.compile`), so parameter names and checkpoints stay the same;
    `options` go to torch.compile (tests pass a cheaper backend).

    `chunk`: the whole chunk, embedding to the head's logits, is one graph (the TP=1 GPU loss runs after it:
    parallel/cross_entropy.py `dense_loss`; at TP > 1 the loss is in the graph): the fusions span layer boundaries,
    but Dynamo unrolls every layer into it, so compile time grows with the depth. `layer` (regional
    compilation): each transformer layer is compiled on its own, and since Dynamo treats a module's parameters
    and buffers as graph inputs, the first layer's graph serves every other layer without recompiling (a
    layer's differences, its dropout site among them, are buffers: tests/unit/test_compile.py counts the
    recompiles), so compile time is one layer's. Per-layer graphs also keep TP collectives outside compiled
    code and let gradients become ready layer by layer, so DP bucket reductions overlap the rest of backward
    (a whole-chunk graph hands every gradient over at its very end). `auto`: compile_granularity."""
    keep_loss_out_of_graphs()
    layers = max((len(c.layers) for c in chunks), default=0)
    dropout = any(c.cfg.hidden_dropout > 0 or c.cfg.attention_dropout > 0 for c in chunks)
    mode = compile_granularity(granularity, ps.tp, ps.dp, layers, dropout, any(uses_fp8(c) for c in chunks))
    for c in chunks:
        if mode == "chunk":
            c.compile(**options)
        else:
            for layer in c.layers.values():
                layer.compile(**options)


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The model settings for evaluation and generation: no dropout, no recompute."""
    cfg = copy.deepcopy(cfg)
    cfg.hidden_dropout = cfg.attention_dropout = 0.0
    cfg.recompute_granularity = None
    return cfg


def build_full_model(cfg: ModelConfig, vocab_size: int, device: torch.device = torch.device("cpu"),
                     seed: int = 0) -> GPTModel:
    """The whole model (every layer, embeddings and head) on one device, uninitialised."""
    ps = ParallelState.single(device)
    return GPTModel(cfg, ps, TPRNG(seed, ps), vocab_size=vocab_size)


_RANDOM_INIT = (torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.trunc_normal_,
                torch.nn.init.kaiming_uniform_, torch.Tensor.normal_, torch.Tensor.uniform_)


class _NoRandomInit(TorchFunctionMode):
    """Random initialisers leave their tensor as it is: on the meta device there is nothing to fill, and torch's
    meta `normal_` (nn.Embedding's own init) is a Python reference whose first call imports Dynamo (a second)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RANDOM_INIT:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build_meta_chunk(cfg: ModelConfig, vocab_size: int, tp: int, sequence_parallel: bool, layer_ids: list,
                     pre_process: bool, post_process: bool) -> GPTModel:
    """One tensor-parallel rank's model chunk on the meta device: its parameters' names (in registration order),
    shapes and metadata as `build_model_chunks` makes them (gradient-accumulation fusion's marks as without
    FP8), with nothing allocated or initialised (the planner reads its parameter list from it)."""
    ps = ParallelState.tp_rank_view(tp, sequence_parallel)
    with _NoRandomInit():
        m = GPTModel(cfg, ps, TPRNG(0, ps), vocab_size=vocab_size, layer_ids=layer_ids, pre_process=pre_process,
                     post_process=post_process)
    if not cfg.no_gradient_accumulation_fusion:   # the weights it marks (without FP8, which takes fewer)
        enable_grad_accumulation_fusion(m)
    return m


def build_inference_model(cfg: ModelConfig, vocab_size: int, tensors: dict, device: torch.device,
                          dtype: torch.dtype, seed: int = 0) -> GPTModel:
    """The whole model in eval mode from full tensors by global name (vocabulary rows unpadded or padded)."""
    model = build_full_model(inference_config(cfg), vocab_size, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = tensors[name]
            p.zero_()
            p[:w.shape[0]].copy_(w)          # padded vocabulary rows stay zero
    return model.to(device=device).cast_parameters(dtype).eval()

