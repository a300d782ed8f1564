"""The run's layout (gpt3d/parallel/layout.py): whatever `resolve` accepts, the runtime runs; the planner proposes
exactly what it accepts.

Properties over world size, TP, PP, virtual stages (or an uneven split), layers, heads, micro-batch and global
batch: `resolve` either refuses in one ConfigError or its layout adds up (TP x PP x DP = world, micro-batch x DP
x micro-batches = global batch, the padded vocabulary a multiple of the padding x TP), every stage's chunks
partition the layers in pipeline order, and the real pipeline schedule (`forward_backward`, traced on in-process
stages) runs every micro-batch through every chunk once without error. And `gpt3d plan`'s candidates are exactly
the layouts of its search space that `resolve` accepts.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d.config import Config
from gpt3d.errors import ConfigError, Gpt3dError
from gpt3d.parallel.layout import resolve, stage_layers
from gpt3d.plan.layout import MICRO_BATCH_SIZES, enumerate_layouts
from tests.support.schedule_trace import trace_schedule

PROFILE = dict(suppress_health_check=[HealthCheck.too_slow])


def config(*, layers: int, heads: int, kv_heads: int = 0, tp: int = 1, pp: int = 1, per_vstage: int = 0,
           split: str = "", mbs: int = 1, gbs: int = 0, sp: bool = False, seq: int = 8, vocab: int = 100) -> Config:
    return Config.from_dict({
        "num_layers": layers, "hidden_size": 4 * heads, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or None, "seq_length": seq, "max_position_embeddings": seq,
        "vocab_size": vocab, "make_vocab_size_divisible_by": 8,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "sequence_parallel": sp,
        "num_layers_per_virtual_pipeline_stage": per_vstage or None, "pipeline_model_parallel_split": split or None,
        "micro_batch_size": mbs, "global_batch_size": gbs or None, "train_iters": 1, "mock_data": True})


@st.composite
def layouts(draw):
    """A config and a world size: mostly a layout built to be valid, then (one time in three) one number nudged,
    so that each rule is broken somewhere and `resolve` is tried on both sides of it."""
    pp, tp, dp = draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 4])), draw(st.integers(1, 3))
    heads = tp * draw(st.integers(1, 3))
    kv = draw(st.sampled_from([0] + [k for k in range(tp, heads + 1, tp) if heads % k == 0]))
    kind = draw(st.sampled_from(["equal", "interleaved", "split"]))
    per_vstage, split, vp = 0, "", 1
    if kind == "interleaved" and pp > 1:
        per_vstage, vp = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        layers = per_vstage * pp * vp
    elif kind == "split" and pp > 1:
        sizes = draw(st.lists(st.integers(1, 4), min_size=pp, max_size=pp))
        split, layers = ",".join(map(str, sizes)), sum(sizes)
    else:
        layers = pp * draw(st.integers(1, 3))
    mbs = draw(st.integers(1, 3))
    num_micro = (pp if vp > 1 else 1) * draw(st.integers(1, 3))
    gbs = 0 if num_micro == 1 and draw(st.booleans()) else mbs * dp * num_micro
    world, sp, seq = tp * pp * dp, draw(st.booleans()), 8
    nudge = draw(st.sampled_from([None, None, "world", "layers", "heads", "kv", "gbs", "micro", "seq", "split"]))
    if nudge == "world":
        world += draw(st.integers(1, 3))
    elif nudge == "layers":
        layers += draw(st.integers(1, 3))
        split = ""
    elif nudge == "heads":
        heads, kv = heads + 1, 0
    elif nudge == "kv":
        kv = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    elif nudge == "gbs":
        gbs = draw(st.integers(1, 48))
    elif nudge == "micro":   # one micro-batch more: off the interleaved schedule's multiple of PP
        gbs = mbs * dp * (num_micro + 1)
    elif nudge == "seq":
        seq = draw(st.integers(2, 9))
    elif nudge == "split":
        split = ",".join(map(str, draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))))
    return config(layers=layers, heads=heads, kv_heads=kv, tp=tp, pp=pp, per_vstage=per_vstage, split=split,
                  mbs=mbs, gbs=gbs, sp=sp, seq=seq, vocab=draw(st.integers(1, 300))), world


@fuzz(150, **PROFILE)
@given(layouts())
def test_a_layout_resolve_accepts_runs(case):
    cfg, world = case
    try:
        lay = resolve(cfg, world, cfg.model.vocab_size)
    except Gpt3dError as e:
        assert isinstance(e, ConfigError) and "\n" not in str(e)
        return
    m, t = cfg.model, cfg.training
    assert lay.tp * lay.pp * lay.dp == world and lay.world == world
    assert lay.global_batch == lay.micro_batch_size * lay.dp * lay.num_micro >= 1
    assert lay.global_batch == (t.global_batch_size or t.micro_batch_size * lay.dp)
    for size in (m.num_attention_heads, m.kv_heads, m.ffn_size, m.hidden_size):
        assert size % lay.tp == 0
    step = m.make_vocab_size_divisible_by * lay.tp
    assert lay.padded_vocab % step == 0 and m.vocab_size <= lay.padded_vocab < m.vocab_size + step
    # every layer on exactly one chunk, in pipeline order: virtual stage v*PP + p is chunk v of stage p
    assert len(lay.stages) == lay.pp and all(len(chunks) == lay.vp for chunks in lay.stages)
    order = [ids for v in range(lay.vp) for p in range(lay.pp) for ids in [lay.stages[p][v]]]
    assert [i for ids in order for i in ids] == list(range(m.num_layers))
    assert all(ids for ids in order), "a chunk without layers"
    for p in range(lay.pp):   # what the model builder builds on each stage
        assert stage_layers(m.num_layers, lay.pp, p, cfg.parallel.pipeline_model_parallel_split,
                            cfg.parallel.num_layers_per_virtual_pipeline_stage) == lay.stage_layers(p)
    # the real schedule, every stage in its own thread: each micro-batch through each chunk once, no error
    trace = trace_schedule(lay.pp, lay.num_micro, lay.vp)
    assert not trace.errors, trace.errors
    for p, log in enumerate(trace.logs):
        runs = [ev[:3] for ev in log if ev[0] in ("F", "B")]
        expected = {(kind, v * lay.pp + p, i) for kind in "FB" for v in range(lay.vp) for i in range(lay.num_micro)}
        assert sorted(runs) == sorted(expected), f"stage {p}"


def test_the_issue_layout_is_refused_in_one_line():
    """2 ranks, PP 2, one layer per virtual stage (2 chunks per stage), 3 micro-batches: the interleaved schedule
    cannot run it; it used to pass validation and die at the first step with a ValueError traceback."""
    cfg = config(layers=4, heads=4, pp=2, per_vstage=1, mbs=2, gbs=6)
    try:
        cfg.validate(2)
    except ConfigError as e:
        assert "micro-batches per step (3" in str(e) and "multiple of --pipeline-model-parallel-size (2)" in str(e)
    else:
        raise AssertionError("validate accepted a layout the interleaved schedule cannot run")
    assert resolve(config(layers=4, heads=4, pp=2, per_vstage=1, mbs=2, gbs=8), 2).vp == 2


def _resolvable(cfg: Config, world: int, tp: int, pp: int, vp: int, mbs: int) -> bool:
    """The runtime accepts `cfg` at TP, PP, VP chunks per stage (through --num-layers-per-virtual-pipeline-stage)
    and micro-batch `mbs`."""
    m = cfg.model
    per_vstage = m.num_layers // (pp * vp) if vp > 1 else 0
    if vp > 1 and per_vstage * pp * vp != m.num_layers:
        return False   # no --num-layers-per-virtual-pipeline-stage gives `vp` chunks
    c = config(layers=m.num_layers, heads=m.num_attention_heads, tp=tp, pp=pp, per_vstage=per_vstage, mbs=mbs,
               gbs=cfg.training.global_batch_size)
    try:
        return resolve(c, world).vp == vp
    except ConfigError:
        return False


@fuzz(40, **PROFILE)
@given(world=st.integers(1, 16), gpus_per_node=st.sampled_from([1, 2, 4, 8]), layers=st.integers(1, 12),
       heads=st.sampled_from([1, 2, 4, 6, 8]), gbs=st.integers(1, 48))
def test_the_planner_proposes_exactly_the_layouts_the_runtime_accepts(world, gpus_per_node, layers, heads, gbs):
    cfg = config(layers=layers, heads=heads, gbs=gbs)
    max_virtual = 8
    proposed = {(lay.tp, lay.pp, lay.vp, lay.mbs)
                for lay in enumerate_layouts(cfg, world, gpus_per_node, max_virtual=max_virtual)
                if not lay.sp and lay.recompute is None and lay.zero == 1}
    space = [(tp, pp, vp, mbs) for tp in (1, 2, 4, 8, 16) if tp <= gpus_per_node and world % tp == 0
             for pp in range(1, world // tp + 1) if (world // tp) % pp == 0
             for vp in range(1, max_virtual + 1) for mbs in MICRO_BATCH_SIZES]
    accepted = {s for s in space if _resolvable(cfg, world, *s)}
    assert proposed == accepted, (sorted(proposed - accepted), sorted(accepted - proposed))
