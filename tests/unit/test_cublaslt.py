"""gpt3d/model/cublaslt.py on CPU: the layout translation, the ops' references, the linear, and where training
routes its GEMMs there.

- `problem` (row-major a @ b as cuBLAS's column-major call) is checked against an emulation of cuBLAS's
  column-major GEMM that reads the operands' raw storage (integer-valued float64: exact), for every pairing of
  row- and column-contiguous operands with padded leading dimensions; a swapped transpose or leading dimension
  fails it;
- the ops' references are torch's mm/addmm, GeLU and GeLU's gradient; they are honest to torch.compile;
- `linear` (the set_matmul function) gives F.linear's output and gradients in float64, eagerly and compiled;
- training routes its linears there where `gemm_tuning` says: the switch, CUDA + nvmath-python + bf16/fp16
  (forced here), never in deterministic mode, after FP8 and the fused functions, which take the flag themselves.
On a GPU benchmarks/cublaslt_check.py checks the cuBLASLt path against these references.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st

from tests.support.fuzz import fuzz

from gpt3d.model import bias_grad, cublaslt
from gpt3d.model.gpt import MLP
from gpt3d.parallel.layers import ColumnParallelLinear, RowParallelLinear
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState

from tests.support.curves import tiny_config
from tests.support.fp8 import assert_same

CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")


def _operand(g: torch.Generator, rows: int, cols: int, col_major: bool, pad: int) -> torch.Tensor:
    """A [rows, cols] matrix, rows- or columns-contiguous, its leading dimension padded by `pad`."""
    if col_major:
        base = torch.randint(-4, 5, (cols, rows + pad), generator=g).double()
        return base[:, :rows].t()
    base = torch.randint(-4, 5, (rows, cols + pad), generator=g).double()
    return base[:, :cols]


def _col_major(t: torch.Tensor, layout: tuple[int, int, int], trans: str) -> torch.Tensor:
    """What cuBLAS reads: a column-major (rows, cols, ld) matrix at t's storage, transposed when trans is T."""
    rows, cols, ld = layout
    m = torch.as_strided(t, (rows, cols), (1, ld), t.storage_offset())
    return m.t() if trans == "T" else m


@fuzz(60)
@given(m=st.integers(1, 9), n=st.integers(1, 9), k=st.integers(1, 9), a_cm=st.booleans(), b_cm=st.booleans(),
       pad_a=st.integers(0, 3), pad_b=st.integers(0, 3), seed=st.integers(0, 2 ** 31 - 1))
def test_problem_is_cublass_column_major_form_of_the_product(m, n, k, a_cm, b_cm, pad_a, pad_b, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = _operand(g, m, k, a_cm, pad_a), _operand(g, k, n, b_cm, pad_b)
    p = cublaslt.problem(a.shape, a.stride(), b.shape, b.stride())
    assert p is not None and (p.m, p.n, p.k) == (n, m, k)
    d = _col_major(b, p.a_layout, p.transa) @ _col_major(a, p.b_layout, p.transb)   # D = op(A) op(B), N x M
    assert d.shape == (n, m)
    # D is column-major with ld N: the same memory as the row-major [M, N] result
    assert torch.equal(d.t().contiguous(), a @ b)


def test_problem_refuses_what_needs_a_copy():
    x = torch.zeros(4, 6, 5)[:, :, 0]   # neither dimension contiguous
    assert cublaslt.problem(x.shape, x.stride(), (6, 3), (3, 1)) is None
    assert cublaslt.problem((3, 6), (6, 1), x.t().shape, x.t().stride()) is None


@fuzz(20)
@given(m=st.integers(1, 7), n=st.integers(1, 7), k=st.integers(1, 7), seed=st.integers(0, 2 ** 31 - 1))
def test_references_are_torchs(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a, b, bias = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((m, k), (k, n), (n,)))
    pre = torch.addmm(bias, a, b)
    assert_same([cublaslt.lt_mm(a, b, None), cublaslt.lt_mm(a, b, bias)], [a @ b, pre])
    out, got_pre = cublaslt.lt_mm_gelu(a, b, bias)
    assert_same([out, got_pre], [F.gelu(pre, approximate="tanh"), pre])
    x = pre.clone().requires_grad_()
    F.gelu(x, approximate="tanh").backward(a @ b)
    assert_same([cublaslt.lt_mm_dgelu(a, b, pre)], [x.grad])


def test_the_ops_are_honest_to_torch_compile():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        a, b, bias = (torch.randn(*s, generator=g).to(dtype) for s in ((5, 3), (3, 8), (8,)))
        for args in ((a, b, None), (a, b, bias), (a.t().contiguous().t(), b.t().contiguous().t(), bias)):
            torch.library.opcheck(cublaslt.lt_mm, args, test_utils=CHECKS)
        torch.library.opcheck(cublaslt.lt_mm_gelu, (a, b, bias), test_utils=CHECKS)
        torch.library.opcheck(cublaslt.lt_mm_dgelu, (a, b, torch.randn(5, 8, generator=g).to(dtype)),
                              test_utils=CHECKS)


def _linear_grads(fn, x, w, b, dy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    y = fn(x, w, b)
    y.backward(dy)
    return [y.detach(), x.grad, w.grad] + ([b.grad] if b is not None else [])


@fuzz(30)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), fin=st.integers(1, 7), fout=st.integers(1, 7),
       bias=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_linear_is_f_linear_float64(lead, fin, fout, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, dy = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((*lead, fin), (fout, fin), (*lead, fout)))
    b = torch.randn(fout, generator=g, dtype=torch.float64) if bias else None
    assert_same(_linear_grads(cublaslt.linear, x, w, b, dy), _linear_grads(F.linear, x, w, b, dy))


def test_linear_compiled_is_eager():
    g = torch.Generator().manual_seed(0)
    x, w, b, dy = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 3, 5), (4, 5), (4,), (2, 3, 4)))
    compiled = torch.compile(cublaslt.linear, backend="aot_eager", fullgraph=True)
    assert_same(_linear_grads(compiled, x, w, b, dy), _linear_grads(F.linear, x, w, b, dy))


def test_a_wrong_weight_gradient_is_caught(monkeypatch):
    """The comparison above sees a weight gradient computed as dy^T x with x's rows shifted by one."""
    g = torch.Generator().manual_seed(2)
    x, w, b, dy = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 5), (4, 5), (4,), (6, 4)))
    real = cublaslt.lt_mm

    def shifted(a, c, bias):
        return real(a, c.roll(1, 0), bias) if a.shape[0] == 4 and c.shape[1] == 5 else real(a, c, bias)
    monkeypatch.setattr(cublaslt, "lt_mm", shifted)
    with pytest.raises(AssertionError):
        assert_same(_linear_grads(cublaslt.linear, x, w, b, dy), _linear_grads(F.linear, x, w, b, dy))


GPT = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=250)


@pytest.mark.parametrize("switch", [False, True])
@pytest.mark.parametrize("applies", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_training_routes_the_gemms_where_gemm_tuning_says(monkeypatch, switch, applies, deterministic, arch):
    import gpt3d.model.build as build
    seen = []
    monkeypatch.setattr(build, "cublaslt_applies", lambda d, t: seen.append((d.type, t)) or applies)
    monkeypatch.setattr(build, "bias_grad_fusion_applies", lambda d, t: True)
    extra = dict(swiglu=True, disable_bias_linear=True, ffn_hidden_size=64) if arch == "llama" else {}
    cfg = tiny_config(**GPT, **extra, compile=False, gemm_tuning=switch, deterministic_mode=deterministic)
    assert tiny_config().model.gemm_tuning   # on unless switched off
    ps = ParallelState()
    (m,) = build.build_model_chunks(cfg, ps, seed_everything(1, ps), vocab_size=250).chunks
    want = switch and applies and not deterministic
    linears = [x for x in m.modules() if isinstance(x, (ColumnParallelLinear, RowParallelLinear))]
    routed = [x for x in linears if x._matmul is cublaslt.linear]
    # GPT: the fused MLP and QKV functions run those linears' GEMMs, so only the attention's projection is left
    left = [layer.attention.proj for layer in m.layers.values()] if arch == "gpt" else linears
    assert routed == (left if want else [])
    fused = [f for x in m.modules() for f in (getattr(x, "_fused", None), getattr(x, "_fused_qkv", None))
             if f is not None]
    assert all(f.lt is want for f in fused)
    if arch == "gpt":   # biased GeLU: the fused functions, with the flag
        assert len(fused) == 2 * cfg.model.num_layers and any(isinstance(x, MLP) for x in m.modules())
    else:
        assert fused == []


def test_fp8_linears_keep_their_gemms(monkeypatch):
    """FP8 comes first; its linears (and fused functions) are not re-routed."""
    import functools

    import gpt3d.model.build as build
    from gpt3d.model.fp8 import Float8Matmul, enable_fp8
    monkeypatch.setattr(build, "cublaslt_applies", lambda d, t: True)
    monkeypatch.setattr(build, "enable_fp8", functools.partial(enable_fp8, emulate=True))
    cfg = tiny_config(**GPT, compile=False, fp8=True, bf16=True)
    ps = ParallelState()
    (m,) = build.build_model_chunks(cfg, ps, seed_everything(1, ps), vocab_size=250).chunks
    linears = [x for x in m.modules() if isinstance(x, (ColumnParallelLinear, RowParallelLinear))]
    assert linears and all(isinstance(x._matmul, Float8Matmul) for x in linears)
    assert not any(isinstance(getattr(x, "_fused", None), bias_grad.FusedGeluMLP) for x in m.modules())


class _Clock:
    """Stands in for CUDA events: each candidate advances the clock by its cost."""
    now = 0.0

    def __init__(self, enable_timing: bool = True):
        self.t = 0.0

    def record(self):
        self.t = _Clock.now

    def synchronize(self):
        pass

    def elapsed_time(self, end: _Clock) -> float:
        return end.t - self.t


@fuzz(40)
@given(costs=st.lists(st.one_of(st.integers(1, 10_000), st.none()), min_size=1, max_size=6),
       capturing=st.booleans())
@example(costs=[None, 5081, 5522, 9000, 9000, 5081], capturing=False)   # a tie that float costs once broke
def test_fastest_keeps_the_first_unless_another_is_clearly_faster(costs, capturing):
    """The choice rule the tuning rests on: the first candidate unless another times more than 3% faster; one that
    raises is out; nothing is timed while a CUDA graph is being captured. (None: a candidate that raises; whole
    costs keep the fake clock's sums exact, so equal costs tie and the first of them wins, as min's does.)"""
    _Clock.now = 0.0
    def candidate(cost):
        def go():
            if cost is None:
                raise RuntimeError("refused")
            _Clock.now += cost
        return go
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "Event", _Clock)
        mp.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        got = cublaslt.fastest([candidate(c) for c in costs])
    times = [float("inf") if c is None else 3 * c for c in costs]
    best = min(range(len(costs)), key=times.__getitem__)
    if capturing or len(costs) == 1 or times[0] <= times[best] * 1.03:
        assert got == 0
    else:
        assert got == best and times[best] < times[0] / 1.03


@pytest.mark.parametrize("bf16,fp16", [(True, True), (False, True), (True, False), (False, False)])
def test_reduction_schemes_follow_torchs_flags(bf16, fp16):
    """Split-K reductions in the output type only where torch allows reduced-precision reductions for that dtype."""
    m = torch.backends.cuda.matmul   # a module-like object monkeypatch cannot patch: set and restore by hand
    saved = m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction
    try:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = bf16, fp16
        assert cublaslt._reduction_mask(torch.bfloat16) == (7 if bf16 else 2)
        assert cublaslt._reduction_mask(torch.float16) == (7 if fp16 else 2)
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = saved


@fuzz(30)
@given(calls=st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=1, max_size=12),
       chosen=st.integers(0, 2))
def test_pick_chooses_once_per_problem_and_never_while_capturing(calls, chosen):
    """`pick` (the MLP backward's and the forward GeLU GEMM's choice between ways): a problem's way is chosen by
    `fastest` the first time the problem is met outside a CUDA-graph capture and kept; while capturing, an unchosen
    problem runs the first way and stays unchosen. (calls: (problem, capturing) in order.)"""
    choices: dict = {}
    timed: list = []
    capturing = [False]
    ran: list = []
    def fastest(ways):
        timed.append(len(ways))
        return chosen
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cublaslt, "fastest", fastest)
        mp.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
        for key, cap in calls:
            capturing[0] = cap
            before = (key,) in choices
            cublaslt.pick(choices, (key,), [lambda i=i: ran.append(i) for i in range(3)])
            assert ran[-1] == (chosen if before or not cap else 0)
            assert ((key,) in choices) == (before or not cap)
    assert len(timed) == len({k for k, cap in calls if not cap})   # once per problem met outside a capture


def test_a_chosen_way_that_raises_later_gives_way_to_the_default():
    """Once chosen, a way other than the first that raises is dropped for that problem with a warning, and the
    first computes the result from then on (the ways compute the same thing)."""
    calls: list = []
    def broken():
        calls.append("quack")
        raise RuntimeError("kernel refused")
    choices = {("p",): 1}
    with pytest.warns(RuntimeWarning, match="RuntimeError: kernel refused"):
        assert cublaslt.pick(choices, ("p",), [lambda: calls.append("lt") or "lt", broken]) == "lt"
    assert choices == {("p",): 0} and calls == ["quack", "lt"]
    assert cublaslt.pick(choices, ("p",), [lambda: "lt", broken]) == "lt"   # not tried again


@fuzz(60)
@given(r=st.integers(1, 40), c=st.integers(1, 40), pad=st.integers(0, 9), offset=st.integers(0, 9),
       transposed=st.booleans(), broadcast=st.booleans())
@example(r=3, c=8, pad=0, offset=0, transposed=False, broadcast=True)   # a broadcast row
@example(r=3, c=8, pad=0, offset=0, transposed=True, broadcast=True)
@example(r=4, c=16, pad=8, offset=8, transposed=True, broadcast=False)
def test_quack_loads_only_aligned_non_overlapping_matrices(r, c, pad, offset, transposed, broadcast):
    """model/quack_gemm.py's layout rule, on CPU tensors: a bf16 matrix cut from a fresh allocation at `offset`
    elements, rows `c + pad` elements apart (or its transpose), is loadable exactly when that row pitch and the
    offset are whole 16-byte units; a broadcast dimension (stride 0) never is."""
    from gpt3d.model import quack_gemm
    base = torch.zeros(offset + r * (c + pad) + 16, dtype=torch.bfloat16)
    assert base.data_ptr() % 64 == 0   # CPU allocations are 64-byte aligned
    t = base.as_strided((r, c), (c + pad, 1), offset)
    if broadcast:
        t = base.as_strided((r, c), (0, 1), offset)
    t = t.t() if transposed else t
    want = not broadcast and (c + pad) % 8 == 0 and offset % 8 == 0
    assert quack_gemm.loadable(t) == want


def test_quack_takes_nothing_on_cpu():
    """On CPU (and without quack-kernels) the quack ways decline: cuBLASLt's ways or the reference serve."""
    from gpt3d.model import quack_gemm
    a, b, bias = torch.randn(32, 16, dtype=torch.bfloat16), torch.randn(16, 24, dtype=torch.bfloat16), \
        torch.randn(24, dtype=torch.bfloat16)
    assert quack_gemm.loadable(a) and quack_gemm.loadable(b) and quack_gemm.loadable(bias)
    assert not quack_gemm.takes(a, b, bias) and quack_gemm.mm_gelu(a, b, bias) is None


def test_quack_problems_counts_the_problems_on_quacks_ways(monkeypatch):
    """What `gpt3d bench` reports per row: the forward GeLU problems on way 1 and the MLP backward's on way 2."""
    monkeypatch.setattr(cublaslt, "GELU_WAYS", {("a",): 0, ("b",): 1, ("c",): 1})
    monkeypatch.setattr(bias_grad, "_GELU_GRAD_CHOICE", {("a",): 0, ("b",): 1, ("c",): 2})
    assert bias_grad.quack_problems() == 3
