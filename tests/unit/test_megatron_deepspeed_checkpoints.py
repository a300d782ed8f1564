"""Reading Megatron-DeepSpeed checkpoints, piece by piece: the restricted unpickler, the QKV and SwiGLU
rearrangements, the ZeRO partition arithmetic, the loss-scaler mapping, the refusals; and, on the reference
checkpoints Megatron-DeepSpeed wrote (tests/support/mds.py), the merged shards against what their own
pickled param_shapes, param_slice_mappings and args say."""
from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt3d.checkpoint.megatron_deepspeed import importer, names, settings as mds_settings, unpickle
from gpt3d.checkpoint.megatron_deepspeed.convert import Converter, fragments, plan
from gpt3d.checkpoint.megatron_deepspeed.source import Checkpoint
from gpt3d.config import Config, apply_flat, flatten
from gpt3d.errors import CheckpointError
from gpt3d.hf import fuse_qkv
from gpt3d.optim.grad_scaler import DynamicLossScaler

from tests.support import ROOT
from tests.support.mds import FIXTURES, needs_fixtures, runs


# ----- the restricted unpickler ---------------------------------------------------------------------------------
class _Planted:
    """An object whose unpickling calls `fn(*args)`: what a malicious .pt file holds."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _dangerous(marker: str) -> list:
    import builtins
    import shutil
    return [(os.system, (f"touch {marker}",)), (builtins.exec, (f"open({marker!r}, 'w')",)),
            (builtins.eval, (f"open({marker!r}, 'w')",)), (subprocess.check_call, (["touch", marker],)),
            (shutil.copy, (__file__, marker)), (builtins.open, (marker, "w")), (builtins.getattr, (marker, "upper")),
            (torch.load, (marker,)), (np.save, (marker, np.zeros(1))), (pickle.loads, (b"\x80\x02N.",))]


@settings(max_examples=25, deadline=None)
@given(pick=st.integers(0, 9), where=st.sampled_from(["top", "args", "nested", "object array"]))
def test_the_unpickler_refuses_any_other_global_and_runs_nothing(tmp_path_factory, pick, where):
    tmp = tmp_path_factory.mktemp("planted")
    marker = str(tmp / "ran")
    fn, args = _dangerous(marker)[pick]
    evil = _Planted(fn, *args)
    obj = {"top": evil, "args": {"args": evil, "iteration": 3},
           "nested": {"module": {"language_model": [1, (2, {"x": evil})]}},
           "object array": {"rng": np.array([evil, 1], dtype=object)}}[where]
    path = str(tmp / "mp_rank_00_model_states.pt")
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as e:
        unpickle.load(path)
    msg = str(e.value)
    assert path in msg and "refusing to unpickle" in msg and "\n" not in msg
    assert not os.path.exists(marker)


def test_the_stand_ins_keep_state_and_import_nothing(tmp_path):
    """The Megatron/DeepSpeed classes a checkpoint names become plain stand-ins (their modules never imported)."""
    code = ("import sys, torch; from gpt3d.checkpoint.megatron_deepspeed import unpickle; "
            "o = unpickle.load(sys.argv[1]); "
            "print(type(o['s']).__name__, o['s'].get('cur_scale'), o['ns'].x, o['arr'].dtype, "
            "any(m.split('.')[0] in ('megatron', 'deepspeed') for m in sys.modules))")
    # a pickle naming the real class, written without DeepSpeed: its module faked for the save only
    name = "deepspeed.runtime.fp16.loss_scaler"
    fakes = {".".join(name.split(".")[:i]): types.ModuleType(".".join(name.split(".")[:i])) for i in range(1, 5)}

    class LossScaler:
        def __init__(self):
            self.cur_scale, self.dynamic = 1024.0, True
    LossScaler.__module__, LossScaler.__qualname__ = name, "LossScaler"
    fakes[name].LossScaler = LossScaler
    with mock.patch.dict(sys.modules, fakes):
        import argparse
        torch.save({"s": LossScaler(), "ns": argparse.Namespace(x=3), "arr": np.arange(4, dtype=np.uint32)},
                   tmp_path / "f.pt")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.pt")], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["LossScaler", "1024.0", "3", "uint32", "False"]


def test_a_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript"):
        unpickle.load(str(path))


def _planted_checkpoint(root, marker: str) -> str:
    d = root / "ckpt" / "global_step3"
    d.mkdir(parents=True)
    (root / "ckpt" / "latest").write_text("global_step3")
    torch.save({"args": _Planted(os.system, f"touch {marker}"), "iteration": 3}, d / "mp_rank_00_model_states.pt")
    return str(root / "ckpt")


@pytest.mark.parametrize("command", ["train", "import"])
def test_a_planted_checkpoint_is_one_error_line_and_runs_nothing(tmp_path, command):
    marker = str(tmp_path / "ran")
    src = _planted_checkpoint(tmp_path, marker)
    out = str(tmp_path / "out")
    argv = {"train": ["train", "--tokenizer-type", "NullTokenizer", "--vocab-size", "16", "--data-path", "x",
                      "--train-iters", "1", "--load", src, "--save", out],
            "import": ["checkpoint", "import-megatron-deepspeed", "--load", src, "--save", out]}[command]
    r = subprocess.run([sys.executable, "-m", "gpt3d", *argv], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt3d: error: ") and "posix.system" in lines[0], r.stderr
    assert "mp_rank_00_model_states.pt" in lines[0]
    assert not os.path.exists(marker) and not os.path.exists(out)


# ----- QKV, SwiGLU, ranges --------------------------------------------------------------------------------------
@st.composite
def attention(draw):
    kv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 3))
    tp = draw(st.sampled_from([d for d in (1, 2, 4) if kv % d == 0]))
    return kv * group, kv, draw(st.integers(1, 3)), tp, draw(st.integers(1, 3))


@settings(max_examples=60, deadline=None)
@given(shape=attention(), data=st.data())
def test_post_fpdt_qkv_blocks_become_gpt3ds_groups(shape, data):
    """A [all q | all k | all v] TP shard is regrouped into gpt3d's per-group [q.., k, v] rows, whole or in any
    pieces (ZeRO partitions cut parameters anywhere)."""
    heads, kv, hd, tp, width = shape
    sh = names.Shapes(heads // tp, kv // tp, hd, False, names.QKV_BLOCKS)
    rows = (heads + 2 * kv) // tp * hd
    src = torch.arange(rows * width, dtype=torch.float64).reshape(rows, width)
    q, k, v = src.split([heads // tp * hd, kv // tp * hd, kv // tp * hd])
    want = fuse_qkv(q, k, v, heads // tp, kv // tp, hd).reshape(-1)
    cuts = sorted(data.draw(st.lists(st.integers(0, src.numel()), max_size=4)))
    got = torch.full_like(want, -1)
    t = names.Target("layers.0.attention.qkv.weight", qkv=names.QKV_BLOCKS)
    for lo, hi in zip([0, *cuts], [*cuts, src.numel()]):
        for dst, dlo, slo, n in names.pieces(t, src.numel(), lo, hi, sh):
            assert dst == t.name
            got[dlo:dlo + n] = src.reshape(-1)[lo + slo:lo + slo + n]
    assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(f=st.integers(1, 12), h=st.integers(1, 5), data=st.data())
def test_swiglu_halves_become_gate_and_fc1(f, h, data):
    src = torch.arange(2 * f * h, dtype=torch.float64)
    lo = data.draw(st.integers(0, src.numel()))
    hi = data.draw(st.integers(lo, src.numel()))
    t = names.Target("layers.1.mlp.fc1.weight", gate="layers.1.mlp.gate.weight")
    out = {t.name: torch.full((f * h,), -1.0, dtype=torch.float64), t.gate: torch.full((f * h,), -1.0,
                                                                                       dtype=torch.float64)}
    for dst, dlo, slo, n in names.pieces(t, src.numel(), lo, hi, None):
        out[dst][dlo:dlo + n] = src[lo + slo:lo + slo + n]
    gate, up = src.chunk(2)   # Megatron-DeepSpeed's swiglu: silu(first half) * second half
    for dst, ref in ((t.gate, gate), (t.name, up)):
        written = out[dst] >= 0
        assert torch.equal(out[dst][written], ref[written])
        idx = torch.arange(f * h) + (0 if dst == t.gate else f * h)
        assert torch.equal(written, (idx >= lo) & (idx < hi))


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6), dp=st.integers(1, 4), pad=st.integers(0, 7))
def test_partition_fragments_cover_every_element_once(sizes, dp, pad):
    shapes = {f"p{i}": (n,) for i, n in enumerate(sizes)}
    part = math.ceil((sum(sizes) + pad) / dp)
    seen = {n: torch.zeros(s, dtype=torch.int64) for n, (s,) in shapes.items()}
    for d in range(dp):
        for name, (start, n, lo, numel) in fragments(shapes, part, dp, d).items():
            assert 0 <= start and start + n <= part and numel == shapes[name][0]
            seen[name][lo:lo + n] += 1
    assert all(bool((v == 1).all()) for v in seen.values())


# ----- refusals ------------------------------------------------------------------------------------------------
def _stub(**args) -> Checkpoint:
    base = dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, kv_channels=16, optimizer="adam",
                lr_decay_style="cosine", normalization="layernorm", swiglu=False)
    c = Checkpoint.__new__(Checkpoint)
    c.args, c.tp, c.dir, c.checkpoint_version = {**base, **args}, 2, "/ckpt/global_step3", 3.0
    return c


@pytest.mark.parametrize("args, version, match", [
    ({"ds_sequence_parallel_fpdt": False, "num_key_value_heads": 2}, 3.0, "QKV layout is unknown"),
    ({}, 1.0, "checkpoint_version 1.0"),
    ({"num_experts": [4]}, 3.0, "mixture of experts"),
    ({"apply_layernorm_1p": True}, 3.0, "apply-layernorm-1p"),
    ({"optimizer": "sgd"}, 3.0, "Adam runs only"),
    ({"lr_decay_style": "inverse-square-root"}, 3.0, "lr-decay-style"),
    ({"kv_channels": 32}, 3.0, "kv_channels"),
])
def test_what_gpt3d_cannot_continue_is_refused_in_one_line(args, version, match):
    c = _stub(**args)
    c.checkpoint_version = version
    with pytest.raises(CheckpointError, match=match) as e:
        mds_settings.refuse_unsupported(c)
        mds_settings.shapes(c)
    assert "\n" not in str(e.value)


def test_the_qkv_layout_is_recognised():
    assert mds_settings.shapes(_stub()).qkv_layout == names.QKV_GROUPED            # up to 6acc370a
    assert mds_settings.shapes(_stub(ds_sequence_parallel_fpdt=False)).qkv_layout == names.QKV_BLOCKS   # after


# ----- fp16 loss scaler ------------------------------------------------------------------------------------------
def _deepspeed_update(s: dict, overflow: bool) -> None:
    """DeepSpeed's DynamicLossScaler.update_scale (deepspeed/runtime/fp16/loss_scaler.py), restated."""
    if overflow:
        if s["delayed_shift"] == 1 or s["cur_hysteresis"] == 1:
            s["cur_scale"] = max(s["cur_scale"] / s["scale_factor"], s["min_scale"])
        else:
            s["cur_hysteresis"] -= 1
        s["last_overflow_iter"] = s["cur_iter"]
    elif (s["cur_iter"] - s["last_overflow_iter"]) % s["scale_window"] == 0:
        s["cur_hysteresis"] = s["delayed_shift"]
        s["cur_scale"] *= s["scale_factor"]
    s["cur_iter"] += 1


@settings(max_examples=80, deadline=None)
@given(before=st.lists(st.booleans(), max_size=30), after=st.lists(st.booleans(), min_size=1, max_size=30),
       window=st.integers(1, 6), hysteresis=st.integers(1, 3))
def test_deepspeeds_loss_scaler_state_continues_as_gpt3ds(before, after, window, hysteresis):
    ds = {"cur_scale": 2.0 ** 16, "cur_iter": 0, "last_overflow_iter": -1, "scale_factor": 2.0,
          "scale_window": window, "min_scale": 1.0, "delayed_shift": hysteresis, "cur_hysteresis": hysteresis}
    for o in before:
        _deepspeed_update(ds, o)
    scaler_state = types.SimpleNamespace(get=lambda k, d=None: ds.get(k, d))
    ckpt = types.SimpleNamespace(args={"fp16": True}, has_optimizer_state=True,
                                 shards=[types.SimpleNamespace(optim_files={0: "f"})])
    mine = DynamicLossScaler(types.SimpleNamespace(loss_scale=None, initial_loss_scale=1.0, min_loss_scale=1.0,
                                                   loss_scale_window=window, hysteresis=hysteresis),
                             torch.device("cpu"))
    saved = {"optimizer_state_dict": {"loss_scaler": scaler_state, "dynamic_loss_scale": True}}
    with mock.patch.object(unpickle, "load", lambda path: saved):
        mine.load_state_dict(importer.scaler_state(ckpt))
    for o in after:
        _deepspeed_update(ds, o)
        mine.update(torch.tensor([float(o)]))
        assert float(mine.scale) == ds["cur_scale"]


# ----- the reference checkpoints ------------------------------------------------------------------------------
def _tag_dirs():
    return [FIXTURES / r / "ckpt" / f"global_step{i}" for r in runs() for i in (3, 6)]


@needs_fixtures
def test_partition_arithmetic_matches_every_recorded_slice_mapping():
    """DeepSpeed's param_slice_mappings, recomputed from param_shapes, the partition size and the DP rank."""
    checked = 0
    for d in _tag_dirs():
        ckpt = Checkpoint(str(d))
        for shard in ckpt.shards:
            for dp, path in shard.optim_files.items():
                osd = unpickle.load(path)["optimizer_state_dict"]
                for g, recorded in enumerate(osd["param_slice_mappings"]):
                    got = fragments(shard.param_shapes[g], osd["single_partition_of_fp32_groups"][g].numel(),
                                    ckpt.dp, dp)
                    assert {n: (a.get("start"), a.get("numel")) for n, a in recorded.items()} == \
                        {n: (s, k) for n, (s, k, _, _) in got.items()}, path
                    checked += 1
    assert checked >= 2 * len(runs())


@needs_fixtures
@pytest.mark.parametrize("run", runs())
def test_merged_shards_have_the_layout_the_args_and_param_shapes_describe(run):
    """Every TP shard converted, then merged along gpt3d's split dimension, gives the full shapes of the model
    the run's args describe; each merged tensor's TP slice is the saved shard (both engines, every TP size),
    and replicated tensors are the same in every TP shard."""
    ckpt = Checkpoint(str(FIXTURES / run / "ckpt"), iteration=3)
    cfg = Config()
    apply_flat(cfg, flatten(mds_settings.settings(ckpt)))
    layout = importer.model_layout(cfg, mds_settings.padded_vocab(ckpt))
    importer.check_names(ckpt, layout)
    conv = Converter(ckpt, layout, mds_settings.shapes(ckpt))
    shards = {}
    for job in plan(ckpt, with_optimizer=False):
        for name, t in conv.run(job)[0].items():
            shards.setdefault(name, {})[job.shard.tp] = t
    assert set(shards) == set(layout)
    a = ckpt.args
    assert layout["embedding.word_embeddings.weight"]["shape"] == [a["padded_vocab_size"], a["hidden_size"]]
    assert layout["layers.0.attention.qkv.weight"]["shape"] == [3 * a["hidden_size"], a["hidden_size"]]
    for name, per_tp in shards.items():
        info = layout[name]
        assert sorted(per_tp) == list(range(ckpt.tp)), name
        if info["split_dim"] is None:
            assert all(torch.equal(per_tp[0], x) for x in per_tp.values()), name
            full = per_tp[0]
        else:
            full = torch.cat([per_tp[t] for t in range(ckpt.tp)], dim=info["split_dim"])
        assert list(full.shape) == info["shape"], name
    # the saved shards themselves, in their merged place
    for shard in ckpt.shards:
        shapes = {n: s for g in shard.param_shapes for n, s in g.items()}
        for name, raw in conv._sources(shard).items():
            t = conv._target(name, shard)
            if t is None:
                continue
            assert tuple(raw.shape) == tuple(shapes[name]), name
            if t.gate is None and t.qkv != names.QKV_BLOCKS:
                assert torch.equal(shards[t.name][shard.tp], raw), name


@needs_fixtures
def test_tied_embedding_copies_agree_across_stages():
    """The last stage's copy of the tied embedding (left out of the conversion) holds the first stage's state."""
    for run in runs():
        ckpt = Checkpoint(str(FIXTURES / run / "ckpt"), iteration=3)
        if ckpt.pp == 1:
            continue
        for tp in range(ckpt.tp):
            first, last = (next(s for s in ckpt.shards if s.tp == tp and s.pp == p) for p in (0, ckpt.pp - 1))
            states = []
            for s in (first, last):
                osd = unpickle.load(s.optim_files[0])["optimizer_state_dict"]
                frag = fragments(s.param_shapes[0], osd["single_partition_of_fp32_groups"][0].numel(), 1, 0)
                start, n, _, _ = frag["tied_modules.embed.word_embeddings.weight"]
                states.append(torch.cat([osd["single_partition_of_fp32_groups"][0][start:start + n],
                                         osd["base_optimizer_state"]["state"][0]["exp_avg_sq"][start:start + n]]))
            assert torch.equal(*states), run


@needs_fixtures
def test_fixture_files_are_read_without_megatron_or_deepspeed():
    code = ("import sys; from gpt3d.checkpoint.megatron_deepspeed import unpickle\n"
            "import glob\nfor f in sorted(glob.glob(sys.argv[1] + '/*/ckpt/global_step3/*.pt')): unpickle.load(f)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'megatron', 'deepspeed'}))")
    out = subprocess.run([sys.executable, "-c", code, str(FIXTURES)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_pickle_module_shim_is_the_only_unpickler():
    """torch.load gets the restricted Unpickler and load (its own wrapper subclasses the Unpickler)."""
    assert issubclass(unpickle.PICKLE_MODULE.Unpickler, pickle.Unpickler)
    assert unpickle.PICKLE_MODULE.Unpickler.find_class is unpickle.RestrictedUnpickler.find_class
