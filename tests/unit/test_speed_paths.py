"""Rewrites made for speed keep their results: the block-table mock dataset yields the same tokens as the
step-by-step Markov chain, and the on-device fp16 loss scaler follows Megatron's rules without a host read;
and a model keeps every tensor on its own device (no host-synchronising copy in a compiled forward)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d.config import PrecisionConfig
from gpt3d.data.sampler import MockGPTDataset
from gpt3d.optim.grad_scaler import DynamicLossScaler


def _chain(ds: MockGPTDataset, i: int) -> np.ndarray:
    """The definition: a new generator per sample, one successor lookup per token."""
    rng = np.random.RandomState((ds.seed * 1_000_003 + i) % (2 ** 32))
    choice = rng.randint(0, 4, size=ds.seq + 1)
    out = np.empty(ds.seq + 1, dtype=np.int64)
    out[0] = rng.randint(0, ds.active)
    for t in range(1, ds.seq + 1):
        out[t] = ds.succ[out[t - 1], choice[t]]
    return out


@pytest.mark.parametrize("seq,vocab,seed", [(64, 50257, 1234), (15, 256, 7), (1, 50, 2), (130, 300, 11)])
def test_mock_dataset_equals_the_markov_chain(seq, vocab, seed):
    ds = MockGPTDataset(40, seq, vocab, seed)
    for i in [0, 1, 17, 39, 3, 0]:   # any order, repeated: a sample depends on (seed, i) only
        got = ds[i]["text"]
        assert got.dtype == np.int64 and got.shape == (seq + 1,)
        assert np.array_equal(got, _chain(ds, i))


def _reference(flags, scale, window, hysteresis, min_scale):
    """Megatron's dynamic loss scaler, step by step on the host."""
    good, left, out = 0, hysteresis, []
    for overflow in flags:
        if overflow:
            good, left = 0, left - 1
            if left <= 0:
                scale = max(scale / 2, min_scale)
        else:
            good += 1
            if good % window == 0:
                scale, left = scale * 2, hysteresis
        out.append(scale)
    return out


def test_device_loss_scaler_follows_megatron_rules():
    cfg = PrecisionConfig(fp16=True, initial_loss_scale=2.0 ** 8, loss_scale_window=3, hysteresis=2,
                          min_loss_scale=4.0)
    flags = [1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    scaler = DynamicLossScaler(cfg, torch.device("cpu"))
    scales, skipped = [], []
    for f in flags:
        s = scaler.update(torch.tensor([float(f)]))
        assert isinstance(s, torch.Tensor)        # the decision stays a tensor: no host sync per step
        skipped.append(bool(s))
        scales.append(float(scaler.scale))
    assert skipped == [bool(f) for f in flags]
    assert scales == _reference(flags, 2.0 ** 8, 3, 2, 4.0)
    state = scaler.state_dict()
    again = DynamicLossScaler(cfg, torch.device("cpu"))
    again.load_state_dict(state)
    assert again.state_dict() == state



@fuzz(25)
@given(rotary=st.sampled_from([None, 1.0, 0.5, 0.25]), swiglu=st.booleans(), gqa=st.booleans(),
       tp=st.sampled_from([1, 2]), untie=st.booleans(), stage=st.sampled_from(["first", "last", "whole", "middle"]))
def test_a_model_keeps_every_tensor_on_its_device(rotary, swiglu, gqa, tp, untie, stage):
    """A buffer left on the CPU in a GPU model (RoPE's inv_freq was) is copied to the GPU in every compiled forward,
    and that copy waits for all queued GPU work: 16 host synchronisations a step at the Llama shape. The meta
    device stands in for the GPU: for any architecture, TP rank view and pipeline stage, every parameter and buffer
    must live there; and the RoPE frequencies keep the bits computed on the CPU (HF's)."""
    from tests.support.curves import tiny_config
    from gpt3d.model.gpt import GPTModel
    from gpt3d.parallel.random import seed_everything
    from gpt3d.parallel.state import ParallelState

    flags = dict(swiglu=swiglu, num_key_value_heads=2 if gqa else None,
                 untie_embeddings_and_output_weights=untie)
    if rotary is not None:
        flags.update(use_rotary_position_embeddings=True, rotary_percent=rotary)
    cfg = tiny_config(**flags).model
    ps = ParallelState.tp_rank_view(tp)
    first, last = {"first": (True, False), "last": (False, True), "whole": (True, True),
                   "middle": (False, False)}[stage]
    model = GPTModel(cfg, ps, seed_everything(1, ps), vocab_size=64, layer_ids=[0, 1], pre_process=first,
                     post_process=last)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert any(n.endswith("inv_freq") for n in tensors) == (rotary is not None)
    assert {n: t.device.type for n, t in tensors.items() if t.device != ps.device} == {}
    if rotary is not None:   # the frequencies a CPU build holds: HF Llama's formula, bit for bit
        cpu_ps = ParallelState.single(torch.device("cpu"))
        cpu = GPTModel(cfg, cpu_ps, seed_everything(1, cpu_ps), vocab_size=64, layer_ids=[0])
        inv = [b for n, b in cpu.named_buffers() if n.endswith("inv_freq")]
        rot = int(cfg.head_dim * rotary)
        expect = 1.0 / (cfg.rotary_base ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))
        assert len(inv) == 1 and inv[0].device.type == "cpu" and torch.equal(inv[0], expect)
