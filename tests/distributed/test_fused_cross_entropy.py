"""The fused (chunked) output projection + cross entropy equals logits-then-loss: loss, input and weight
gradients, at TP=1 and with the vocabulary split over TP=2 (gloo), padded columns included."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt3d.config import ParallelConfig
from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.cross_entropy import linear_cross_entropy
from gpt3d.parallel.mappings import copy_to_tp
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState, build_parallel_state

from tests.support import distributed
from tests.support.curves import tiny_config

N, H, VOCAB, PADDED = 45, 16, 123, 128


def _data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, H, generator=g), torch.randn(PADDED, H, generator=g),
            torch.randint(0, VOCAB, (N,), generator=g))


def _dense(x, w, t):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy((x @ w.t())[:, :VOCAB], t, reduction="none")
    loss.mean().backward()
    return loss.detach(), x.grad, w.grad


def test_fused_equals_logits_then_loss_tp1():
    x0, w0, t = _data()
    ref_loss, ref_dx, ref_dw = _dense(x0, w0, t)
    for chunk in (7, 16, 64):   # uneven last chunk, several chunks, one chunk
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = linear_cross_entropy(x, w, t, VOCAB, ParallelState(), chunk_tokens=chunk)
        loss.mean().backward()
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, ref_dx, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w.grad, ref_dw, atol=1e-6, rtol=1e-5)
        assert float(w.grad[VOCAB:].abs().max()) == 0.0   # padded rows get no gradient
    with torch.no_grad():   # evaluation: loss only
        loss = linear_cross_entropy(x0, w0, t, VOCAB, ParallelState(), chunk_tokens=16)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)


def _tp_case(rank: int, world: int) -> dict:
    ps = build_parallel_state(ParallelConfig(tensor_model_parallel_size=world), world, rank, torch.device("cpu"))
    x0, w0, t = _data()
    x = x0.clone().requires_grad_()
    w = w0.chunk(world)[rank].clone().requires_grad_()     # this rank's vocabulary rows
    loss = linear_cross_entropy(copy_to_tp(x, ps), w, t, VOCAB, ps, chunk_tokens=16)
    loss.mean().backward()                                   # copy_to_tp all-reduces the input gradient
    parts = [torch.zeros_like(w.grad) for _ in range(world)]
    dist.all_gather(parts, w.grad)
    return {"loss": loss.detach(), "dx": x.grad, "dw": torch.cat(parts)}


def _model_case(rank: int, world: int) -> dict:
    """Whole model at TP=2 + SP: fused and unfused loss give the same loss and gradients."""
    out = {}
    for fused in (False, True):
        cfg = tiny_config(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=250,
                          cross_entropy_loss_fusion=fused)
        ps = build_parallel_state(ParallelConfig(tensor_model_parallel_size=world, sequence_parallel=True), world,
                                  rank, torch.device("cpu"))
        m = GPTModel(cfg.model, ps, seed_everything(5, ps), vocab_size=250)
        m.init_weights(9)
        tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(4))
        loss = m(tokens, tokens)
        loss.mean().backward()
        out[fused] = (loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()})
    return {"loss_diff": float((out[True][0] - out[False][0]).abs().max()),
            "grad_diff": max(float((out[True][1][k] - out[False][1][k]).abs().max()) for k in out[True][1])}


def test_fused_equals_logits_then_loss_tp2():
    ref_loss, ref_dx, ref_dw = _dense(*_data())
    for r in distributed.run(2, _tp_case):
        torch.testing.assert_close(r["loss"], ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["dx"], ref_dx, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["dw"], ref_dw, atol=1e-6, rtol=1e-5)
    for r in distributed.run(2, _model_case):
        assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5
