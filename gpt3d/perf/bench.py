"""`gpt3d bench`: gpt3d's real training step vs a Hugging Face peer, same shape, same batch, same process.

gpt3d runs `Trainer.train_step` (bf16 or fp16 params, optionally FP8 GEMMs,
fp32 master weights in the ZeRO optimizer, its AdamW step, clipping) on synthetic
tokens. The peer is `transformers.GPT2LMHeadModel` for the GPT-3 shapes and
`LlamaForCausalLM` for the Llama shape, with SDPA attention, autocast (bf16, or
fp16 with a GradScaler under --fp16), fused AdamW, clipping and torch.compile.
Both report tokens/s, TFLOPs/GPU by Megatron-DeepSpeed's formula and by
6N+12lhs, MFU (model FLOPs of gpt3d/perf/flops.py) against --peak-tflops, and peak
memory; gpt3d's row shows its ratio to the peer. `measure` returns the rows; gpt3d/commands/bench.py prints
them.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Optional
from collections.abc import Callable

import torch

from ..config import DEFAULT_VOCAB_SIZE as VOCAB, Config
from ..errors import ConfigError
from .throughput import Throughput

LLAMA = dict(use_rotary_position_embeddings=True, normalization="rmsnorm", swiglu=True, disable_bias_linear=True,
             untie_embeddings_and_output_weights=True)
SHAPES = {
    "125M": dict(num_layers=12, hidden_size=768, num_attention_heads=12, micro_batch_size=16),
    "350M": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, micro_batch_size=8),
    "1.3B": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, micro_batch_size=8),
    "llama-1.5B": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                       ffn_hidden_size=8192, vocab_size=128256, micro_batch_size=4, **LLAMA),
}


@dataclass
class BenchOptions:
    """What `gpt3d bench` measures: its flags (gpt3d/commands/bench.py), which take their defaults from here."""
    model: list = field(default_factory=lambda: ["125M", "1.3B"])   # SHAPES names, or "custom"
    num_layers: Optional[int] = None            # the custom shape
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    seq_length: int = 2048
    micro_batch_size: Optional[int] = None      # None: the shape's
    iters: int = 10
    warmup: int = 3
    peer: str = "hf"                            # "hf" or "none"
    peer_first: bool = False
    compile: bool = True
    recompute_granularity: Optional[str] = None
    use_flash_attn: bool = False
    attention_backend: str = "auto"
    micro_batches: int = 1
    fp16: bool = False
    fp8: bool = False
    fp8_recipe: str = "tensorwise"
    ce_fusion: bool = False
    gemm_tuning: bool = True                    # model/cublaslt.py where it applies, as in training
    peak_tflops: Optional[float] = None         # None: the GPU's own (`gpt3d bench` resolves it first)


def _config(shape: str, args: BenchOptions) -> Config:
    if shape == "custom":
        given = {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
                 "num_attention_heads": args.num_attention_heads}
        if None in given.values():
            raise ConfigError("--model custom needs --num-layers, --hidden-size and --num-attention-heads")
        s = {**given, "micro_batch_size": args.micro_batch_size or 8}
    elif shape in SHAPES:
        s = dict(SHAPES[shape])
    else:
        raise ConfigError(f"unknown shape '{shape}' (choose from {', '.join(SHAPES)}, custom)")
    if args.fp8 and args.fp16:
        raise ConfigError("--fp8 runs on bf16 weights: drop --fp16")
    mbs = args.micro_batch_size or s.pop("micro_batch_size")
    s.pop("micro_batch_size", None)
    s.setdefault("vocab_size", VOCAB)
    cfg = Config.from_dict({**s, "seq_length": args.seq_length, "max_position_embeddings": args.seq_length,
                            "hidden_dropout": 0.0, "attention_dropout": 0.0,
                            "micro_batch_size": mbs, "global_batch_size": mbs * args.micro_batches,
                            "train_iters": 1000, "attention_backend": args.attention_backend,
                            "mock_data": True, "bf16": not args.fp16, "fp16": args.fp16, "fp8": args.fp8,
                            "fp8_recipe": args.fp8_recipe, "cross_entropy_loss_fusion": args.ce_fusion,
                            "gemm_tuning": args.gemm_tuning,
                            "lr": 1e-4, "weight_decay": 0.1,
                            "clip_grad": 1.0, "device": "cuda", "compile": args.compile,
                            "recompute_granularity": args.recompute_granularity,
                            "use_flash_attn": args.use_flash_attn, "peak_tflops": args.peak_tflops,
                            "log_interval": 1000})
    return cfg


def _time(step, warmup: int, iters: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters, torch.cuda.max_memory_allocated() / 2 ** 30


def bench_gpt3d(cfg: Config, warmup: int, iters: int) -> dict:
    from ..parallel.state import ParallelState
    from ..train import Trainer
    trainer = Trainer(cfg, ParallelState.single(torch.device("cuda")))
    mbs, seq = cfg.training.micro_batch_size, cfg.model.seq_length
    gen = torch.Generator(device="cuda").manual_seed(0)
    text = torch.randint(0, cfg.model.vocab_size, (trainer.num_micro, mbs, seq + 1), device="cuda", generator=gen)
    batch = [{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in text]
    try:
        sec, mem = _time(lambda: trainer.train_step(batch), warmup, iters)
    finally:
        trainer = batch = text = None   # free the GPU memory before the next shape (the closure sees None)
        torch._dynamo.reset()   # compiled graphs hold the model's tensors
    return {"seconds_per_iter": sec, "peak_mem_gib": mem}


def bench_hf(cfg: Config, warmup: int, iters: int) -> dict:
    """The peer at the same global batch: if its micro-batch does not fit, halve it and accumulate more."""
    from ..parallel.layout import resolve
    one_gpu = resolve(cfg, 1)
    mbs, micro = one_gpu.micro_batch_size, one_gpu.num_micro
    while True:
        try:
            r = _bench_hf(cfg, mbs, micro, warmup, iters)
            return {**r, "peer_micro_batch": f"{mbs}x{micro}"}
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            if mbs == 1:
                raise
            mbs, micro = mbs // 2, micro * 2


def _hf_model(cfg: Config):
    """The peer a user would otherwise pick: GPT-2 for GPT-3 shapes, Llama for RoPE+RMSNorm+SwiGLU shapes."""
    from ..console.quiet import quiet_imports
    m = cfg.model
    with quiet_imports():   # transformers imports torchao, which logs lines about its CUDA extensions
        import transformers  # noqa: F401
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401
    if m.swiglu:
        from transformers import LlamaConfig, LlamaForCausalLM
        hf_cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
                             num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                             num_key_value_heads=m.kv_heads, max_position_embeddings=m.seq_length,
                             rms_norm_eps=m.layernorm_epsilon, rope_theta=float(m.rotary_base),
                             tie_word_embeddings=not m.untie_embeddings_and_output_weights,
                             attention_bias=not m.disable_bias_linear, mlp_bias=not m.disable_bias_linear)
        return LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    from transformers import GPT2Config, GPT2LMHeadModel
    hf_cfg = GPT2Config(vocab_size=m.vocab_size, n_positions=m.seq_length, n_embd=m.hidden_size,
                        n_layer=m.num_layers, n_head=m.num_attention_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    return GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")


def peer_name(cfg: Config) -> str:
    return "hf-llama-sdpa-compile" if cfg.model.swiglu else "hf-gpt2-sdpa-compile"


def _bench_hf(cfg: Config, mbs: int, micro: int, warmup: int, iters: int) -> dict:
    m = cfg.model
    model = _hf_model(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    compiled = torch.compile(model)
    texts = torch.randint(0, m.vocab_size, (micro, mbs, m.seq_length), device="cuda")
    fp16 = cfg.precision.fp16
    scaler = torch.amp.GradScaler("cuda") if fp16 else None

    def step():
        for text in texts:
            with torch.autocast("cuda", dtype=torch.float16 if fp16 else torch.bfloat16):
                loss = compiled(input_ids=text, labels=text).loss / micro
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        sec, mem = _time(step, warmup, iters)
    finally:
        model = opt = compiled = texts = None   # free the GPU memory before the next shape
        torch._dynamo.reset()
    return {"seconds_per_iter": sec, "peak_mem_gib": mem}


def measure(args: BenchOptions, on_shape: Optional[Callable[[list], None]] = None) -> list:
    """One row (a dict) per shape and system; `on_shape` gets each shape's rows as soon as they are measured."""
    configs = [(shape, _config(shape, args)) for shape in args.model]   # bad shapes fail before any work
    if not torch.cuda.is_available():
        raise ConfigError("bench needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    precision = "fp16" if args.fp16 else f"fp8-{args.fp8_recipe}" if args.fp8 else "bf16"
    rows = []
    from ..model.bias_grad import quack_problems
    from ..model.build import gemm_tuning
    for shape, cfg in configs:
        from ..parallel.layout import padded_vocab_size
        v = cfg.model.vocab_size
        tp = Throughput(cfg.model, v, padded_vocab_size(v, cfg.model.make_vocab_size_divisible_by, 1),
                        cfg.training.global_batch_size, 1, args.peak_tflops)
        runners = [("gpt3d", bench_gpt3d)] + ([(peer_name(cfg), bench_hf)] if args.peer == "hf" else [])
        if args.peer_first:
            runners.reverse()
        for name, fn in runners:
            quack0 = quack_problems()
            try:
                r = fn(cfg, args.warmup, args.iters)
            except torch.cuda.OutOfMemoryError:
                r = {"error": "out of memory"}
            gc.collect()
            torch.cuda.empty_cache()
            row = {"system": name, "shape": shape, "seq": cfg.model.seq_length,
                   "micro_batch": r.pop("peer_micro_batch", f"{cfg.training.micro_batch_size}x{args.micro_batches}"),
                   "precision": precision if name == "gpt3d" else ("fp16" if args.fp16 else "bf16"),
                   "compile": args.compile, "recompute": args.recompute_granularity,
                   "attention": args.attention_backend if name == "gpt3d" else "sdpa-default",
                   # whether the GEMMs ran through tuned cuBLASLt (nvmath-python installed, bf16/fp16, switch on)
                   "gemm_tuning": name == "gpt3d" and gemm_tuning(cfg, torch.device("cuda")),
                   # GEMM problems whose GeLU epilogue ran quack-kernels' (model/quack_gemm.py) rather than cuBLASLt's
                   "quack_epilogues": quack_problems() - quack0 if name == "gpt3d" else 0, **r}
            if "seconds_per_iter" in r:
                row.update(tp.report(r["seconds_per_iter"]))
            rows.append(row)
        peer = next((r for r in rows if r["shape"] == shape and r["system"] != "gpt3d" and "tokens_per_s" in r),
                    None)
        for r in rows:
            if r["shape"] == shape and r["system"] == "gpt3d" and peer and "tokens_per_s" in r:
                r["vs_peer"] = r["tokens_per_s"] / peer["tokens_per_s"]
        if on_shape is not None:
            on_shape([r for r in rows if r["shape"] == shape])
    return rows

