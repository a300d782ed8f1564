"""The planner's activation terms equal what a forward pass really keeps for backward (eager, CPU, exact).

"Keeps" is measured, not listed: the bytes allocated and not freed during one
forward of a real GPTModel chunk (torch.profiler's memory events), i.e. every
tensor autograd or activation checkpointing holds until backward. Compiled
graphs keep a different set (checked on a GPU by benchmarks/plan_check.py).
"""
from __future__ import annotations

import gc
import itertools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState, build_parallel_state
from gpt3d.plan.layout import layout_of
from gpt3d.plan.memory import stage_memory

from tests.support import plan_jobs
from tests.support.curves import tiny_config

LLAMA = dict(use_rotary_position_embeddings=True, normalization="rmsnorm", swiglu=True, disable_bias_linear=True,
             untie_embeddings_and_output_weights=True)


def _cfg(arch: str, recompute, dropout: float, bf16: bool = True, heads: int = 4, kv: int = 1, **kw):
    extra = dict(LLAMA, num_key_value_heads=kv) if arch == "llama" else {}
    return tiny_config(num_layers=2, hidden_size=128, num_attention_heads=heads, seq_length=48, vocab_size=300,
                       micro_batch_size=2, global_batch_size=2, recompute_granularity=recompute,
                       hidden_dropout=dropout, bf16=bf16, **extra, **kw)


def retained_bytes(model: GPTModel, tokens: torch.Tensor) -> int:
    """Bytes allocated and still alive after one training forward (a warm-up forward fills the caches first)."""
    model.train()
    model(tokens[:, :-1], tokens[:, 1:]).float().mean().backward()
    # Nothing made before the profile may be freed inside it (the profiler counts such a free, or not, by
    # whether it saw the address allocated before): no garbage collection, and the replicated-dropout draw
    # counter, which each training forward replaces by a new 8-byte tensor, is held until the profile ends.
    gc.collect()
    gc.disable()
    old_counter = model.tp_rng.counter
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = model(tokens[:, :-1], tokens[:, 1:]).float().mean()
    finally:
        gc.enable()
    kept = sum(e.self_cpu_memory_usage for e in prof.events())
    del loss, old_counter
    return kept - (8 if model._replicated_dropout else 0)   # the new counter: state, not an activation


def measure(cfg, ps: ParallelState) -> tuple[int, float]:
    model = GPTModel(cfg.model, ps, seed_everything(1, ps), vocab_size=cfg.model.vocab_size)
    model.init_weights(1)
    model.cast_parameters(torch.bfloat16 if cfg.precision.bf16 else torch.float32)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.training.micro_batch_size, cfg.model.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    pred = stage_memory(cfg.model, cfg.model.vocab_size, layout_of(cfg, ps.world_size), ps.pp_rank,
                        param_bytes=2 if cfg.precision.bf16 else 4, compiled=False, fused_loss=False, device="cpu")
    return retained_bytes(model, tokens), pred.per_microbatch.total


CASES = list(itertools.product(["gpt", "llama"], [None, "selective", "full"], [0.0, 0.1]))


@pytest.mark.parametrize("arch,recompute,dropout", CASES)
def test_one_process_activation_bytes_are_exact(arch, recompute, dropout):
    torch.manual_seed(0)
    kept, predicted = measure(_cfg(arch, recompute, dropout), ParallelState())
    assert kept > 0 and kept == predicted, (kept, predicted)


@pytest.mark.parametrize("recompute,bf16", list(itertools.product([None, "selective", "full"], [True, False])))
def test_attention_dropout_on_cpu_keeps_the_scores(recompute, bf16):
    """Attention dropout sends CPU's SDPA down its math path, which keeps s x s scores: what makes a long
    --seq-length impossible on a CPU (`gpt3d train` refuses it from this prediction, plan/fits.py). GPT blocks;
    with RoPE or GQA the math path keeps other copies of q/k/v than the fused kernels (not modelled: terms
    linear in the sequence, next to the scores' square)."""
    torch.manual_seed(0)
    kept, predicted = measure(_cfg("gpt", recompute, 0.1, bf16=bf16, attention_dropout=0.1), ParallelState())
    assert kept > 0 and kept == predicted, (kept, predicted)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_fused_linear_loss_activation_bytes_are_exact(arch):
    """--cross-entropy-loss-fusion: no logits; the head's input and fp32 weight gradients are kept instead."""
    kept, predicted = measure(_cfg(arch, None, 0.0, cross_entropy_loss_fusion=True), ParallelState())
    unfused, _ = measure(_cfg(arch, None, 0.0), ParallelState())
    assert kept == predicted and kept != unfused, (kept, predicted, unfused)


def test_fp32_activation_bytes_are_exact():
    kept, predicted = measure(_cfg("gpt", None, 0.0, bf16=False), ParallelState())
    assert kept == predicted


def saved_bytes(model: GPTModel, tokens: torch.Tensor) -> int:
    """Distinct storages autograd saves in one forward, parameters excluded. Deterministic under gloo (the
    profiler's count also sees gloo's own buffers, freed at times of its choosing); blind to what activation
    checkpointing holds, so it is used without recompute. RoPE's cached cos/sin tables belong to the model."""
    model(tokens[:, :-1], tokens[:, 1:])    # fills the RoPE caches
    state = list(model.parameters()) + [t for mod in model.modules() if hasattr(mod, "_cache")
                                        for t in mod._cache[1:] if t is not None]
    params = {p.untyped_storage().data_ptr() for p in state}
    seen: dict = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(tokens[:, :-1], tokens[:, 1:]).float().mean()
    return sum(seen.values())


TP_CASES = [("gpt", False, False), ("gpt", True, False), ("llama", False, False), ("llama", True, False),
            ("gpt", True, True), ("llama", False, True)]   # (arch, sequence parallel, fused linear + loss)


def tp_worker(rank: int, world: int, cases: list) -> list:
    """TP=2 (DP = world / 2: the census is per rank, DP replicas hold the same) under each (arch, sp)."""
    out = []
    for arch, sp, fused in cases:
        cfg = _cfg(arch, None, 0.0, tensor_model_parallel_size=2, sequence_parallel=sp, heads=8, kv=4,
                   cross_entropy_loss_fusion=fused)
        ps = build_parallel_state(cfg.parallel, world, rank, torch.device("cpu"))
        model = GPTModel(cfg.model, ps, seed_everything(1, ps), vocab_size=cfg.model.vocab_size)
        model.init_weights(1)
        model.cast_parameters(torch.bfloat16)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length + 1),
                               generator=torch.Generator().manual_seed(0))
        pred = stage_memory(cfg.model, cfg.model.vocab_size, layout_of(cfg, world), 0, param_bytes=2,
                            compiled=False, fused_loss=False, device="cpu")
        out.append((saved_bytes(model, tokens), pred.per_microbatch.total - pred.per_microbatch.items["loss value"]))
    return out


TP_IDS = [f"{a}-sp{int(s)}" + ("-fused" if f else "") for a, s, f in TP_CASES]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(TP_CASES)), ids=TP_IDS)
def test_tensor_parallel_saved_bytes_are_exact(index):
    """TP=2 (GQA with 2 KV heads per rank, so q is regrouped), with and without sequence parallelism and the
    fused linear + loss."""
    for rank, per_rank in enumerate(plan_jobs.per_rank(4, "tp_activations")):   # tests/support/plan_jobs.py
        saved, predicted = per_rank[index]
        assert saved == predicted, (rank, saved, predicted)
