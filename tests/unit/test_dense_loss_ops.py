"""The TP=1 GPU loss's custom ops (gpt3d/parallel/cross_entropy.py `dense_ce_forward` / `dense_ce_backward_`, whose
CUDA kernels are Triton: cross_entropy_triton.py): their CPU reference is the spec the kernels are checked against
(benchmarks/cross_entropy_probe.py), so here it must equal F.cross_entropy over the real columns -- loss and
gradient, padded columns getting none -- and the ops must be honest to torch.compile (opcheck: fake shapes and
strides, schema with the backward's declared overwrite of the logits, autograd through AOT). In float64 the
reference and F.cross_entropy differ only by rounding. The backward writes the gradient over the saved logits:
a second backward through the same graph must raise, not read the overwritten values."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from tests.support.fuzz import fuzz

from gpt3d.parallel import cross_entropy as CE

CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")


def _case(rows: int, vocab: int, pad: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab + pad, generator=g, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=g)
    weight = torch.rand(rows, generator=g, dtype=torch.float64)   # per-token weights, as a loss mask gives
    return logits, target, weight


@fuzz(25)
@given(rows=st.integers(1, 12), vocab=st.integers(1, 70), pad=st.integers(0, 9), seed=st.integers(0, 2 ** 31 - 1))
def test_reference_equals_cross_entropy_float64(rows, vocab, pad, seed):
    logits, target, weight = _case(rows, vocab, pad, seed, torch.float64)
    x = logits.clone().requires_grad_()
    loss = CE.dense_ce_forward(x * 1, target, vocab)[0]   # the head's output in gpt3d: not a leaf
    (loss * weight).sum().backward()
    want_x = logits.clone().requires_grad_()
    want = F.cross_entropy(want_x[:, :vocab], target, reduction="none")
    (want * weight).sum().backward()
    scale = float(logits.abs().max()) + 1.0
    assert float((loss - want).detach().abs().max()) <= 1e-13 * scale
    assert float((x.grad - want_x.grad).abs().max()) <= 1e-13 * scale
    assert torch.all(x.grad[:, vocab:] == 0)   # padding columns: no gradient
    assert x.grad.is_contiguous()


@fuzz(10)
@given(rows=st.integers(1, 6), vocab=st.integers(2, 30), seed=st.integers(0, 2 ** 31 - 1))
def test_a_target_outside_the_vocabulary_gives_nan(rows, vocab, seed):
    """Nothing is read outside the real columns for it: its loss is NaN, the others are unchanged."""
    logits, target, _ = _case(rows, vocab, 3, seed, torch.float32)
    bad = target.clone()
    bad[0] = vocab + 1 if seed % 2 else -1
    loss = CE.dense_ce_forward(logits, bad, vocab)[0]
    assert torch.isnan(loss[0])
    torch.testing.assert_close(loss[1:], CE.dense_ce_forward(logits, target, vocab)[0][1:], rtol=0, atol=0)


@fuzz(5)
@given(rows=st.integers(1, 10), vocab=st.integers(1, 40), pad=st.integers(0, 5), seed=st.integers(0, 2 ** 31 - 1),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_every_operator_passes_opcheck(rows, vocab, pad, seed, dtype):
    logits, target, weight = _case(rows, vocab, pad, seed, dtype)
    loss, lse = CE.dense_ce_forward(logits, target, vocab)
    assert loss.dtype == lse.dtype == torch.float32
    torch.library.opcheck(CE.dense_ce_forward, (logits.requires_grad_(), target, vocab), test_utils=CHECKS)
    torch.library.opcheck(CE.dense_ce_backward_, (logits.detach().clone(), target, lse, weight.float(), vocab),
                          test_utils=CHECKS[:3])


@fuzz(10)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 30), pad=st.integers(0, 4), seed=st.integers(0, 2 ** 31 - 1))
def test_a_second_backward_raises(rows, vocab, pad, seed):
    logits, target, weight = _case(rows, vocab, pad, seed, torch.float32)
    x = logits.clone().requires_grad_()
    loss = (CE.dense_ce_forward(x * 1, target, vocab)[0] * weight.float()).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _head_and_loss(h, w, t, vocab):
    return CE.dense_loss(h @ w.t(), t, vocab)


@fuzz(5)
@given(rows=st.integers(1, 9), vocab=st.integers(1, 30), pad=st.integers(0, 4), seed=st.integers(0, 2 ** 31 - 1))
def test_the_gradient_is_written_over_the_logits(rows, vocab, pad, seed):
    """One [tokens, vocab] buffer: the gradient the head's backward receives is the logits' own storage."""
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(rows, 8, generator=g, requires_grad=True), torch.randn(vocab + pad, 8, generator=g)
    t = torch.randint(0, vocab, (rows,), generator=g)
    logits = h @ w.t()
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.data_ptr()))
    CE.dense_loss(logits, t, vocab).sum().backward()
    assert seen == [logits.data_ptr()]
    leaf = (h.detach() @ w.t()).requires_grad_()   # a caller's own tensor, or a view of one, is copied
    kept = leaf.detach().clone()
    CE.dense_loss(leaf, t, vocab).sum().backward()
    CE.dense_loss(leaf.view(1, rows, -1), t.view(1, rows), vocab).sum().backward()
    assert torch.equal(leaf.detach(), kept) and leaf.grad is not None


def test_the_loss_stays_out_of_compiled_graphs(monkeypatch):
    """Inside a compiled graph the saved logits are an input of backward, which Inductor copies before an op may
    overwrite it (a whole extra pass): the loss runs eager between graphs, and the gradients are unchanged."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(CE, "_loss_call", CE._dense_loss)
    CE.keep_loss_out_of_graphs()   # what gpt3d's compile policy (model/build.py compile_chunks) calls
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randn(20, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 17, (12,), generator=g)
    got = []
    for fn in (_head_and_loss, torch.compile(_head_and_loss, backend=capture)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w, t, 17)
        loss.mean().backward()
        got.append((loss.detach(), h.grad, w.grad))
    assert graphs and not any("dense_ce" in str(gm.graph) for gm in graphs)
    assert any("matmul" in str(gm.graph) or "mm" in str(gm.graph) for gm in graphs)   # the head was compiled
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lse_is_not_differentiable():
    logits = torch.randn(3, 5, requires_grad=True)
    loss, lse = CE.dense_ce_forward(logits * 1, torch.tensor([0, 1, 4]), 5)
    assert loss.requires_grad and not lse.requires_grad


def test_the_compiled_model_ends_its_graph_at_the_head(monkeypatch):
    """The real route (GPTModel -> vocab_parallel_cross_entropy -> dense_loss, as on a GPU with Triton), the whole
    chunk compiled by gpt3d's compile policy (compile_chunks) through AOTAutograd: no graph holds the loss, the
    first ends at the head's linear, later steps compile nothing new, and three training steps give the eager
    model's losses and gradients bit for bit."""
    from gpt3d.model.build import compile_chunks
    from gpt3d.model.gpt import GPTModel
    from gpt3d.parallel.random import TPRNG
    from gpt3d.parallel.state import ParallelState
    from tests.support.curves import tiny_config
    monkeypatch.setattr(CE, "_dense_device", lambda logits: True)
    monkeypatch.setattr(CE, "_TRITON", True)
    monkeypatch.setattr(CE, "_loss_call", CE._dense_loss)   # as in a fresh process: only compile_chunks switches it
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def capture(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)
    cfg = tiny_config().model
    ps = ParallelState.single(torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 250, (2, 16), generator=g), torch.randint(0, 250, (2, 16), generator=g))
               for _ in range(3)]
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPTModel(cfg, ps, TPRNG(0, ps), vocab_size=250)   # float32: float64 takes the fallback
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        if compiled:
            compile_chunks([model], ps, "chunk", backend=capture)
        out, counts = [], []
        for tokens, labels in batches:
            model.zero_grad()
            loss = model(tokens, labels).mean()
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            counts.append(len(graphs))
        runs.append(out)
    assert graphs and not any("dense_ce" in str(gm.graph) for gm in graphs)
    last_call = [n for n in graphs[0].graph.nodes if n.op == "call_function"][-1]
    assert last_call.target is torch.nn.functional.linear
    assert counts[0] == counts[-1]   # the later steps compiled nothing
    for (l0, g0), (l1, g1) in zip(*runs):
        assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_importing_gpt3d_leaves_dynamo_unloaded():
    """Keeping the loss out of graphs must not import Dynamo at import time (~2.4 s for every gpt3d process, CLI
    and test workers alike): the switch happens where gpt3d compiles."""
    code = ("import sys, gpt3d.cli, gpt3d.commands.train, gpt3d.train, gpt3d.model.build, gpt3d.plan.calibrate, "
            "gpt3d.parallel.cross_entropy; print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
