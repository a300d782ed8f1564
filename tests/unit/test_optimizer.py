"""The distributed optimizer's step equals torch's AdamW after clip_grad_norm_ (one process, fp32 and bf16)."""
from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, strategies as st

from tests.support.fuzz import fuzz
import torch
import torch.nn as nn

from gpt3d.config import OptimizerConfig
from gpt3d.optim.grad_buffer import GradBuffer
from gpt3d.optim.zero import ZeroOptimizer
from gpt3d.parallel.state import ParallelState


def _model(dtype) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 8))
    return m.to(dtype)


@pytest.mark.parametrize("clip", [0.05, 100.0, 0.0])   # clipping active, inactive, disabled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_torch_adamw_with_clipping(clip, dtype):
    cfg = OptimizerConfig(weight_decay=0.1, clip_grad=clip)
    ours, ref = _model(dtype), _model(torch.float32)
    grads = GradBuffer([ours], ParallelState.single())
    opt = ZeroOptimizer(grads, cfg, ParallelState.single())
    decay = [p for p in ref.parameters() if p.ndim > 1]
    no_decay = [p for p in ref.parameters() if p.ndim <= 1]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for step in range(4):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
        grads.zero_grad()
        ours(x.to(dtype)).float().pow(2).mean().backward()
        grads.finish_grad_sync()
        norm, found_inf = opt.step(1e-2)
        assert float(found_inf) == 0.0
        ref_opt.zero_grad()
        ref(x).pow(2).mean().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip if clip > 0 else float("inf"))
        ref_opt.step()
        assert float(norm) == pytest.approx(float(ref_norm), rel=tol, abs=tol)
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)
    if dtype == torch.float32 and clip == 0.05:   # clipping really bound: the norm exceeded the threshold
        assert float(norm) > clip


def _no_sync_worker(rank: int, world: int) -> dict:
    from gpt3d.config import ParallelConfig
    from gpt3d.parallel.state import build_parallel_state
    ps = build_parallel_state(ParallelConfig(), world, rank, torch.device("cpu"))
    model = _model(torch.float32)
    grads = GradBuffer([model], ps, zero_stage=1, bucket_size_mb=0.001)
    grads.zero_grad()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
    with grads.no_sync():
        model(x).pow(2).mean().backward()
    inside = [b.handle is not None for b in grads.buckets]
    model(x).pow(2).mean().backward()
    after = [b.handle is not None for b in grads.buckets]
    grads.finish_grad_sync()
    mine = [(r.name, r.lo, r.hi, grads.grad_data[r.offset:r.offset + r.hi - r.lo].tolist())
            for r in grads.local_ranges()]   # plain lists: tensors would share memory with an exiting process
    return {"inside": inside, "after": after, "mine": mine, "nbytes": grads.nbytes(),
            "numel": sum(p.numel() for p in model.parameters())}


@pytest.mark.slow
def test_grad_buffer_reduces_only_outside_no_sync():
    """DP=2: backward under no_sync starts no reduction; the synced one reduces every bucket as it fills, and
    each rank's shard ends up holding the DP mean of both micro-batches' summed gradients."""
    from tests.support import distributed
    results = distributed.run(2, _no_sync_worker)
    ref = _model(torch.float32)
    for r in range(2):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(r))
        (ref(x).pow(2).mean() * 2 / 2).backward()    # two micro-batches per rank, averaged over two ranks
    dense = {n: p.grad.reshape(-1) for n, p in ref.named_parameters()}
    covered = 0
    for res in results:
        assert not any(res["inside"]) and all(res["after"]), res
        assert res["nbytes"] >= 4 * res["numel"]
        for name, lo, hi, g in res["mine"]:
            torch.testing.assert_close(torch.tensor(g), dense[name][lo:hi], rtol=1e-5, atol=1e-6)
            covered += hi - lo
    assert covered == results[0]["numel"]   # the two shards hold every gradient element once


@fuzz(40)
@given(k=st.integers(-6, 32), clip=st.sampled_from([0.0, 1e-3, 1.0, 1e4]), seed=st.integers(0, 2 ** 16),
       bad=st.sampled_from([None, float("inf"), float("-inf"), float("nan")]))
def test_a_loss_scaled_step_is_the_unscaled_step(k, clip, seed, bad):
    """fp16's loss scale rides inside the AdamW step (no unscaling pass of its own): stepping gradients
    multiplied by a power-of-two scale S with loss_scale=S gives bit for bit the norm, the skip decision and
    the parameters of stepping the plain gradients. A non-finite gradient skips the step."""
    cfg = OptimizerConfig(weight_decay=0.1, clip_grad=clip)
    g = torch.Generator().manual_seed(seed)
    runs = []
    for scale in (None, torch.tensor([2.0 ** k])):
        model = _model(torch.float16)
        grads = GradBuffer([model], ParallelState.single())
        opt = ZeroOptimizer(grads, cfg, ParallelState.single())
        g.manual_seed(seed)
        for r in grads.local_ranges():   # gradients of every magnitude, some past fp16's range once scaled
            n = r.hi - r.lo
            grad = torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 4, (n,), generator=g)
            if bad is not None and r.name.endswith("weight"):
                grad[torch.randint(0, n, (1,), generator=g)] = bad
            grads.grad_data[r.offset:r.offset + n] = grad * (1.0 if scale is None else scale)
        before = grads.param_data.clone()
        norm, found_inf = opt.step(1e-2, scale)
        runs.append((norm, found_inf, grads.param_data.clone(), [m.detach().clone() for m in opt.masters]))
        if bad is not None:
            assert float(found_inf) == 1.0 and torch.equal(grads.param_data, before)
    (n0, f0, p0, m0), (n1, f1, p1, m1) = runs
    assert torch.equal(f0, f1)
    assert torch.equal(n0, n1) or (bad is not None and not torch.isfinite(n0).all() and not torch.isfinite(n1).all())
    assert torch.equal(p0, p1) and all(torch.equal(a, b) for a, b in zip(m0, m1))
    assert bad is not None or not torch.equal(p0, before)   # the step did move the parameters


class _Gated(nn.Module):
    """Four linears with small integer weights; a forward uses only those named in `use` (the rest get no
    gradient that backward). Integer inputs keep every gradient an exact integer, so sums do not depend on
    their order."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(4)).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randint(-2, 3, p.shape, generator=g))

    def forward(self, x, use):
        for i in use:
            x = self.layers[i](x)
        return x.sum()


@fuzz(40)
@given(uses=st.lists(st.lists(st.integers(0, 3), max_size=4), min_size=1, max_size=4),
       bucket_kb=st.sampled_from([0.0001, 0.2, 100.0]))
def test_the_buffer_holds_the_sum_of_every_micro_batchs_gradients(uses, bucket_kb):
    """Whatever subset of parameters each micro-batch reaches (so a parameter's first gradient of the step may
    come in any micro-batch, or none), the fp32/fp64 buffer ends up holding exactly the sum of the
    micro-batches' gradients, and zero for a parameter no micro-batch reached."""
    model = _Gated()
    grads = GradBuffer([model], ParallelState.single(), bucket_size_mb=bucket_kb / 1024)
    want = {p: torch.zeros_like(p) for p in model.parameters()}
    grads.zero_grad()
    for i, use in enumerate(uses):
        x = torch.randint(-3, 4, (3, 6), generator=torch.Generator().manual_seed(i)).double()
        if use:
            reached = [p for j in sorted(set(use)) for p in model.layers[j].parameters()]
            for p, g in zip(reached, torch.autograd.grad(model(x, use), reached)):
                want[p] += g
        last = i == len(uses) - 1
        with contextlib.nullcontext() if last else grads.no_sync():
            if use:
                model(x, use).backward()
    grads.finish_grad_sync()
    for p in model.parameters():
        assert torch.equal(p.main_grad, want[p])
        assert p.grad is None


class _Subset(nn.Module):
    """Three small linears; a forward goes through those named in `use` (the others get no gradient)."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(5, 5) for _ in range(3)).to(dtype)

    def forward(self, x, use):
        for i in use:
            x = torch.tanh(self.layers[i](x))
        return x.float().pow(2).mean()


@fuzz(30)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       clip=st.sampled_from([0.0, 1e-3, 1e4]), seed=st.integers(0, 2 ** 16),
       uses=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=3), min_size=1, max_size=3))
def test_direct_gradients_train_bit_for_bit_as_the_buffer(dtype, clip, seed, uses):
    """One micro-batch at DP 1: the optimizer reading autograd's gradients where they are (no fp32 buffer,
    optim/buckets.py direct_gradients) gives the buffer's norms, skip flags, parameters and masters bit for
    bit, whichever parameters a step reaches (the others step on zeros), fp16's loss scale included, and keeps
    no gradient after its step."""
    cfg = OptimizerConfig(weight_decay=0.1, clip_grad=clip)
    runs = []
    for micro in (None, 1):   # None: the buffer (the trainer passes its micro-batch count)
        model = _Subset(dtype)
        grads = GradBuffer([model], ParallelState.single(), micro_batches=micro)
        assert grads.direct == (micro == 1) and (grads.nbytes() == 0) == grads.direct
        opt = ZeroOptimizer(grads, cfg, ParallelState.single())
        scale = torch.tensor([2.0 ** 12]) if dtype == torch.float16 else None
        out = []
        for i, use in enumerate(uses):
            x = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed + i)).to(dtype)
            grads.zero_grad()
            (model(x, use) * (1.0 if scale is None else scale)).backward()
            grads.finish_grad_sync()
            norm, found_inf = opt.step(1e-2, scale)
            assert all(p.grad is None for p in model.parameters()) and not grads._kept
            out.append((norm, found_inf, grads.param_data.clone(), opt.adamw.master.clone(),
                        opt.adamw.exp_avg.clone(), opt.adamw.exp_avg_sq.clone()))
        runs.append(out)
    for buffered, direct in zip(*runs):
        for a, b in zip(buffered, direct):
            assert torch.equal(a, b)


def test_pieces_loaded_without_moments_restart_their_own_count():
    """Adam's step count is per piece, as torch's per tensor: after loading a state in which one piece has no
    moments, that piece steps as a fresh AdamW (bias corrections from step 1) while the others go on from the
    loaded count; float64, against torch's AdamW per piece."""
    torch.manual_seed(0)
    cfg = OptimizerConfig(weight_decay=0.1, clip_grad=0.0)
    ps = ParallelState.single()

    def make():
        model = _model(torch.float64)
        grads = GradBuffer([model], ps)
        return grads, ZeroOptimizer(grads, cfg, ps)

    def fill(grads, seed):
        g = torch.Generator().manual_seed(seed)
        grads.grad_data.copy_(torch.randn(grads.grad_data.shape, generator=g, dtype=torch.float64))
    grads, opt = make()
    for seed in (1, 2):
        fill(grads, seed)
        opt.step(1e-2)
    state = opt.state_dict()
    dropped = next(iter(state["pieces"]))
    state["pieces"][dropped] = {"master": state["pieces"][dropped]["master"]}
    grads2, opt2 = make()
    opt2.load_state_dict(state)
    assert [int(s) for s in opt2.adamw.steps] == [0 if k == dropped else 2 for k in opt2.state_dict()["pieces"]]
    refs = []
    for i, (key, kinds) in enumerate(state["pieces"].items()):
        w = torch.nn.Parameter(kinds["master"].clone())
        ref = torch.optim.Adam([w], lr=1e-2, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                               weight_decay=0.1 if opt2.pieces[i].param.ndim > 1 else 0.0,
                               decoupled_weight_decay=True, foreach=False)
        if key != dropped:
            ref.state[w] = {"step": torch.tensor(2.0), "exp_avg": kinds["exp_avg"].clone(),
                            "exp_avg_sq": kinds["exp_avg_sq"].clone()}
        refs.append((w, ref))
    fill(grads2, 3)
    opt2.step(1e-2)
    for (w, ref), pc, m in zip(refs, opt2.pieces, opt2.masters):
        w.grad = grads2.grad_data[pc.offset:pc.offset + pc.hi - pc.lo].clone()
        ref.step()
        torch.testing.assert_close(m.detach(), w.detach(), rtol=1e-12, atol=1e-15)
    assert [int(s) for s in opt2.adamw.steps] == [1 if k == dropped else 3 for k in opt2.state_dict()["pieces"]]


@pytest.mark.parametrize("precision", [{}, {"bf16": True}, {"fp16": True}])
def test_a_run_with_direct_gradients_trains_as_with_the_buffer(monkeypatch, precision):
    """The trainer wiring (one micro-batch at DP 1: optim/buckets.py direct_gradients): losses, gradient norms,
    validation loss and the final parameters of a run equal, bit for bit, those of the same run with the fp32
    buffer forced, in fp32, bf16 and fp16 (its loss scale included)."""
    import gpt3d.optim.grad_buffer as gb
    from tests.support.curves import make_trainer, run_curve, tiny_config
    runs = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(gb, "direct_gradients", lambda *a: False)
        t = make_trainer(tiny_config(global_batch_size=2, train_iters=4, **precision))
        assert t.grads.direct == direct and (t.grads.nbytes() == 0) == direct
        curve = run_curve(t.cfg, trainer=t)
        runs.append((curve["losses"], curve["norms"], curve["val"], t.grads.param_data.clone()))
    (l0, n0, v0, p0), (l1, n1, v1, p1) = runs
    assert l0 == l1 and n0 == n1 and v0 == v1 and torch.equal(p0, p1)
