"""The throughput formulas describe the model gpt3d runs, and `gpt3d bench` rejects bad shapes in one line."""
from __future__ import annotations

import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from gpt3d.perf.throughput import Throughput
from gpt3d.perf.flops import megatron_flops_per_iter
from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState

from tests.support.curves import tiny_config


def test_megatron_formula_matches_counted_matmuls():
    """Megatron-DeepSpeed's 72*B*s*l*h^2*(1 + s/6h + V/16lh) = linear layers (24*l*h^2 per token per pass,
    x3 for forward+backward) + attention scores/values (12*B*s^2*h*l) + a logits term of 4.5*B*s*h*V
    (the formula's own convention; the real GEMMs are 6*B*s*h*V). Count the real forward+backward GEMMs."""
    cfg = tiny_config(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=250)
    ps = ParallelState()
    model = GPTModel(cfg.model, ps, seed_everything(1, ps), vocab_size=250)
    b, s, h, n_layers, v = 3, 32, 64, 2, model.padded_vocab
    tokens = torch.randint(0, 250, (b, s))
    with FlopCounterMode(display=False) as counter:
        model(tokens, tokens).mean().backward()
    counts = counter.get_flop_counts()["Global"]
    gemm = sum(n for op, n in counts.items() if str(op) in ("aten.mm", "aten.addmm"))
    formula = megatron_flops_per_iter(cfg.model, v, b)
    attention = 12 * b * s * s * h * n_layers
    assert gemm == formula - attention - 4.5 * b * s * h * v + 6 * b * s * h * v
    tp = Throughput(cfg.model, 250, v, b, world_size=1, peak_tflops=1.0)
    row = tp.report(seconds_per_iter=1.0)
    assert row["tokens_per_s"] == b * s and row["tflops_per_gpu"] * 1e12 == formula
    assert row["mfu"] * 1e12 == row["model_flops_per_token"] * b * s   # 1 s at a 1 TFLOP/s peak (flops.py)


def _bench(*args):
    return subprocess.run([sys.executable, "-m", "gpt3d", "bench", *args], capture_output=True, text=True)


def test_bench_bad_shapes_fail_in_one_line():
    r = _bench("--model", "custom", "--num-layers", "2")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "gpt3d: error: --model custom needs --num-layers, --hidden-size and --num-attention-heads"]
    r = _bench("--model", "7B")
    assert r.returncode == 2 and "unknown shape '7B'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_custom_shape_config():
    import argparse
    from gpt3d.perf.bench import _config
    from gpt3d.commands.bench import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", "custom", "--num-layers", "3", "--hidden-size", "96", "--num-attention-heads",
                         "6", "--micro-batch-size", "2", "--micro-batches", "4", "--seq-length", "128"])
    cfg = _config("custom", args)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (3, 96, 6)
    assert (cfg.training.micro_batch_size, cfg.training.global_batch_size, cfg.model.seq_length) == (2, 8, 128)
    assert cfg.model.gemm_tuning   # as training runs, unless switched off
    assert not _config("125M", p.parse_args(["--model", "125M", "--no-gemm-tuning"])).model.gemm_tuning


def test_bench_llama_shape_and_precision_flags():
    import argparse
    from gpt3d.perf.bench import _config, peer_name
    from gpt3d.commands.bench import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = _config("llama-1.5B", p.parse_args(["--model", "llama-1.5B", "--fp8", "--micro-batches", "2"]))
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.kv_heads, m.ffn_size, m.vocab_size) == \
        (16, 2048, 32, 8, 8192, 128256)
    assert m.swiglu and m.use_rotary_position_embeddings and m.normalization == "rmsnorm"
    assert m.untie_embeddings_and_output_weights and m.disable_bias_linear
    assert (cfg.training.micro_batch_size, cfg.training.global_batch_size) == (4, 8)
    assert cfg.precision.bf16 and cfg.precision.fp8 and cfg.precision.fp8_recipe == "tensorwise"
    assert peer_name(cfg) == "hf-llama-sdpa-compile"
    cfg16 = _config("125M", p.parse_args(["--model", "125M", "--fp16"]))
    assert cfg16.precision.fp16 and not cfg16.precision.bf16 and cfg16.model.vocab_size == 50257
    assert peer_name(cfg16) == "hf-gpt2-sdpa-compile"
    r = _bench("--model", "125M", "--fp8", "--fp16")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["gpt3d: error: --fp8 runs on bf16 weights: drop --fp16"]
