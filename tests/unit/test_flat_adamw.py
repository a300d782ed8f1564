"""The flat AdamW step (gpt3d/optim/adamw.py): torch's AdamW piece by piece, wherever the pieces lie in the
buffers; the kernel's block table covers every element once. (The Triton kernel itself is checked against
`reference_step` on the GPU by benchmarks/adamw_check.py.)"""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from tests.support.fuzz import fuzz
import torch

from gpt3d.optim.adamw import FlatAdamW, Piece, block_table

BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1


def _pieces(sizes: list[int], gaps: list[int], decays: list[bool]) -> tuple[list[Piece], int]:
    """Pieces in buffer order with `gaps` elements before each (bucket padding, other ranks' shards)."""
    out, off, flat = [], 0, 0
    for n, gap, decay in zip(sizes, gaps, decays):
        off += gap
        out.append(Piece(off, flat, n, decay))
        off, flat = off + n, flat + n
    return out, off + 3


layouts = st.integers(1, 5).flatmap(lambda k: st.tuples(
    st.lists(st.integers(1, 40), min_size=k, max_size=k), st.lists(st.integers(0, 4), min_size=k, max_size=k),
    st.lists(st.booleans(), min_size=k, max_size=k)))


@fuzz(40)
@given(layout=layouts, decoupled=st.booleans(), scale=st.sampled_from([None, 0.25, 3.0]),
       skips=st.lists(st.booleans(), min_size=3, max_size=3), seed=st.integers(0, 2 ** 16))
def test_the_step_is_torch_adamw_per_piece(layout, decoupled, scale, skips, seed):
    """float64 parameters (the masters themselves): every piece steps as torch's AdamW (Adam's L2 penalty when
    not decoupled) with its own decay, from its gradient divided by the scale; a step with found_inf set changes
    nothing, its count included; what lies between pieces and the gradient buffer are never written."""
    pieces, total = _pieces(*layout)
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(total, generator=g, dtype=torch.float64)
    opt = FlatAdamW(pieces, params, torch.float64, False, BETAS, EPS, WD, decoupled)
    refs = []
    for pc in pieces:
        w = torch.nn.Parameter(params[pc.offset:pc.offset + pc.numel].clone())
        refs.append((w, torch.optim.Adam([w], lr=1.0, betas=BETAS, eps=EPS, weight_decay=WD if pc.decay else 0.0,
                                         decoupled_weight_decay=decoupled, foreach=False)))
    outside = torch.ones(total, dtype=torch.bool)
    for pc in pieces:
        outside[pc.offset:pc.offset + pc.numel] = False
    before_outside = params[outside].clone()
    for step, skip in enumerate(skips):
        lr = 1e-2 * (step + 1)
        grads = torch.randn(total, generator=g, dtype=torch.float64)
        kept = grads.clone()
        opt.step(grads, lr, None if scale is None else torch.tensor(scale, dtype=torch.float32),
                 torch.tensor(float(skip)))
        assert torch.equal(grads, kept)
        for pc, (w, ref) in zip(pieces, refs):
            if not skip:
                w.grad = grads[pc.offset:pc.offset + pc.numel] / (1.0 if scale is None else scale)
                ref.param_groups[0]["lr"] = lr
                ref.step()
            torch.testing.assert_close(params[pc.offset:pc.offset + pc.numel], w.detach(), rtol=1e-12, atol=1e-15)
            avg, sq = opt.moments(pieces.index(pc))
            st_ = ref.state.get(w, {})
            torch.testing.assert_close(avg, st_.get("exp_avg", torch.zeros_like(avg)), rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(sq, st_.get("exp_avg_sq", torch.zeros_like(sq)), rtol=1e-12, atol=1e-18)
        assert opt.steps.tolist() == [float(sum(not s for s in skips[:step + 1]))] * len(pieces)
        assert torch.equal(params[outside], before_outside)


@fuzz(20)
@given(layout=layouts, seed=st.integers(0, 2 ** 16))
def test_half_parameters_get_their_rounded_masters(layout, seed):
    """bf16 parameters: fp32 masters of their own, and the step writes each master rounded to bf16 into the
    parameter buffer (no copy pass after it); elements outside the pieces keep their bits."""
    pieces, total = _pieces(*layout)
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(total, generator=g).to(torch.bfloat16)
    before = params.clone()
    opt = FlatAdamW(pieces, params, torch.float32, True, BETAS, EPS, WD, True)
    for i, pc in enumerate(pieces):
        assert torch.equal(opt.master_view(i), before[pc.offset:pc.offset + pc.numel].float())
    opt.step(torch.randn(total, generator=g), 1e-2, None, torch.tensor(0.0))
    inside = torch.zeros(total, dtype=torch.bool)
    for i, pc in enumerate(pieces):
        got = params[pc.offset:pc.offset + pc.numel]
        assert torch.equal(got, opt.master_view(i).to(torch.bfloat16))
        assert not torch.equal(got, before[pc.offset:pc.offset + pc.numel]) or pc.numel < 4
        inside[pc.offset:pc.offset + pc.numel] = True
    assert torch.equal(params[~inside], before[~inside])


@fuzz(60)
@given(layout=layouts, block=st.sampled_from([1, 2, 3, 7, 16, 64]))
def test_the_block_table_covers_every_element_once(layout, block):
    """Each row is a run of at most `block` elements inside one piece, with the same place in the buffer and in
    the flat state; together the rows cover every element of every piece exactly once."""
    pieces, total = _pieces(*layout)
    offset, flat, n, piece, decay, start = block_table(pieces, block)
    seen = torch.zeros(total, dtype=torch.int64)
    for o, f, k, i, d, s in zip(offset.tolist(), flat.tolist(), n.tolist(), piece.tolist(), decay.tolist(),
                                start.tolist()):
        pc = pieces[i]
        assert 1 <= k <= block and d == int(pc.decay)
        assert pc.offset <= o and o + k <= pc.offset + pc.numel and f - pc.flat == o - pc.offset == s
        seen[o:o + k] += 1
    want = torch.zeros(total, dtype=torch.int64)
    for pc in pieces:
        want[pc.offset:pc.offset + pc.numel] = 1
    assert torch.equal(seen, want)


@fuzz(30)
@given(layout=layouts, half=st.sampled_from([torch.bfloat16, torch.float16]), decoupled=st.booleans(),
       scale=st.sampled_from([None, 0.25, 3.0]), seed=st.integers(0, 2 ** 16))
def test_per_piece_gradients_step_as_their_fp32_copies(layout, half, decoupled, scale, seed):
    """Direct gradients (optim/buckets.py direct_gradients): one half-precision gradient per piece gives the
    parameters, masters and moments bit for bit what the fp32 buffer holding their exact copies gives."""
    pieces, total = _pieces(*layout)
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(total, generator=g).to(half)
    opts = [FlatAdamW(pieces, params.clone(), torch.float32, True, BETAS, EPS, WD, decoupled) for _ in range(2)]
    sc = None if scale is None else torch.tensor(scale, dtype=torch.float32)
    for _ in range(3):
        per_piece = [(torch.randn(pc.numel, generator=g) * 3).to(half) for pc in pieces]
        buffer = torch.full((total,), float("nan"))   # between pieces: never read
        for pc, gp in zip(pieces, per_piece):
            buffer[pc.offset:pc.offset + pc.numel] = gp.float()
        opts[0].step(buffer, 1e-2, sc, torch.tensor(0.0))
        opts[1].step(per_piece, 1e-2, sc, torch.tensor(0.0))
        for a, b in zip(opts[0].__dict__.items(), opts[1].__dict__.items()):
            if isinstance(a[1], torch.Tensor):
                assert torch.equal(a[1], b[1]), a[0]


def test_no_pieces_no_step():
    opt = FlatAdamW([], torch.zeros(4), torch.float32, False, BETAS, EPS, WD, True)
    opt.step(torch.ones(4), 1e-2, None, torch.tensor(0.0))
    assert opt.steps.numel() == 0


@pytest.mark.parametrize("decoupled", [True, False])
def test_skipped_steps_do_not_count(decoupled):
    """Bias correction follows the steps taken: steps on gradients a, c equal steps on a, (NaN, skipped), c."""
    pieces, total = _pieces([5, 3], [0, 2], [True, False])
    a, c, nan = (torch.full((total,), x, dtype=torch.float64) for x in (0.5, -0.25, float("nan")))
    out = []
    for seq in ([(a, 0.0), (c, 0.0)], [(a, 0.0), (nan, 1.0), (c, 0.0)]):
        params = torch.linspace(-1, 1, total, dtype=torch.float64)
        opt = FlatAdamW(pieces, params, torch.float64, False, BETAS, EPS, WD, decoupled)
        for grads, skip in seq:
            opt.step(grads, 1e-2, None, torch.tensor(skip))
        out.append((params, opt.steps.tolist()))
    assert torch.equal(out[0][0], out[1][0]) and out[0][1] == out[1][1] == [2.0, 2.0]
