"""Reading Megatron-DeepSpeed checkpoints, piece by piece: the weights-only unpickler, the QKV and SwiGLU
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
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d.checkpoint.megatron_deepspeed import importer, names, settings as mds_settings, unpickle
from gpt3d.checkpoint.megatron_deepspeed.convert import Converter, fragments, plan
from gpt3d.checkpoint.megatron_deepspeed.source import Checkpoint
from gpt3d.config import Config, apply_flat, flatten
from gpt3d.errors import CheckpointError
from gpt3d.interop.hf import fuse_qkv
from gpt3d.optim.grad_scaler import DynamicLossScaler

from tests.support import ROOT
from tests.support.mds import FIXTURES, needs_fixtures, runs


# ----- the weights-only unpickler -------------------------------------------------------------------------------
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
            (torch.load, (marker,)), (np.save, (marker, np.zeros(1))), (pickle.loads, (b"\x80\x02N.",))]  # noqa: TID251 (a callable the unpickler must refuse, not a call)


@fuzz(25)
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


@fuzz(60)
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


@fuzz(60)
@given(f=st.integers(1, 12), h=st.integers(1, 5), data=st.data())
def test_swiglu_halves_become_gate_and_fc1(f, h, data):
    src = torch.arange(2 * f * h, dtype=torch.float64)
    lo = data.draw(st.integers(0, src.numel()))
    hi = data.draw(st.integers(lo, src.numel()))
    sh = names.Shapes(4, 4, 16, True, names.QKV_GROUPED)
    t = names.target("language_model.encoder.layers.1.mlp.dense_h_to_4h.weight", sh)
    assert names.target("7.mlp.dense_h_to_4h.weight", sh, {7: ("layer", 1)}) == t   # the pipeline engine's name
    assert (t.name, t.gate) == ("layers.1.mlp.fc1.weight", "layers.1.mlp.gate.weight")
    out = {t.name: torch.full((f * h,), -1.0, dtype=torch.float64), t.gate: torch.full((f * h,), -1.0,
                                                                                       dtype=torch.float64)}
    for dst, dlo, slo, n in names.pieces(t, src.numel(), lo, hi, sh):
        out[dst][dlo:dlo + n] = src[lo + slo:lo + slo + n]
    gate, up = src.chunk(2)   # Megatron-DeepSpeed's swiglu: silu(first half) * second half
    for dst, ref in ((t.gate, gate), (t.name, up)):
        written = out[dst] >= 0
        assert torch.equal(out[dst][written], ref[written])
        idx = torch.arange(f * h) + (0 if dst == t.gate else f * h)
        assert torch.equal(written, (idx >= lo) & (idx < hi))


@fuzz(100)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6), dp=st.integers(1, 4), pad=st.integers(0, 7))
def test_partition_fragments_cover_every_element_once(sizes, dp, pad):
    shapes = {f"p{i}": (n,) for i, n in enumerate(sizes)}
    part = math.ceil((sum(sizes) + pad) / dp)
    seen = {n: torch.zeros(s, dtype=torch.int64) for n, (s,) in shapes.items()}
    for d in range(dp):
        for name, (start, n, lo, numel) in fragments(shapes, part, dp, d).items():
            assert 0 <= start and start + n <= part and numel == shapes[name][0] and 0 <= lo and lo + n <= numel
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


@fuzz(80)
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


def test_files_are_read_by_torchs_weights_only_unpickler_and_the_allowlist_does_not_outlive_a_read(tmp_path):
    """torch.load(weights_only=True) does every read; the names allowed for a Megatron-DeepSpeed file are
    allowed during that read only, so no other torch.load in the process ever accepts them."""
    path = str(tmp_path / "f.pt")
    torch.save({"w": torch.ones(2), "args": __import__("argparse").Namespace(x=1)}, path)
    before = set(torch.serialization.get_safe_globals())   # torch keeps them in a set: compare as one
    with mock.patch.object(torch, "load", wraps=torch.load) as load:
        assert unpickle.load(path)["args"].x == 1
    assert load.call_count == 1 and load.call_args.kwargs["weights_only"] is True
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError):   # outside unpickle.load, the Namespace is refused again
        torch.load(path, weights_only=True)


# ----- a Llama-style run, written the way Megatron-DeepSpeed lays it out ------------------------------------------
def _write_mds_llama(root, tensors: dict, cfg: Config, padded: int, tp: int, dp: int) -> None:
    """A no-pipeline Megatron-DeepSpeed checkpoint of the full gpt3d tensors `tensors` at TP x DP: each TP shard
    of each parameter where Megatron puts it (SwiGLU as [gate; up] per shard, QKV per key/value group), the
    optimizer groups flattened, padded and cut into DP partitions (masters = weights, moments 2w and 3w^2)."""
    import argparse
    from collections import OrderedDict
    m = cfg.model
    d = root / "global_step7"
    d.mkdir(parents=True)
    (root / "latest").write_text("global_step7")
    split = {"qkv": 0, "fc1": 0, "gate": 0, "proj": 1, "fc2": 1}

    def shard(name, t):
        key = next((k for k in split if f".{k}." in f".{name}"), None)
        return t if key is None else t.chunk(tp, dim=split[key])[t_rank]

    args = argparse.Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.kv_heads, kv_channels=m.head_dim, ffn_hidden_size=m.ffn_size, seq_length=m.seq_length,
        max_position_embeddings=m.max_positions, make_vocab_size_divisible_by=8, padded_vocab_size=padded,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, data_parallel_size=dp, swiglu=True,
        normalization="rmsnorm", add_bias_linear=False, use_rotary_position_embeddings=True,
        add_position_embedding=True,
        untie_embeddings_and_output_weights=True, rope_theta=10000, rotary_percent=1.0, layernorm_epsilon=1e-5,
        bias_gelu_fusion=False, optimizer="adam", lr=1e-3, min_lr=1e-4, lr_decay_style="cosine", weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, tokenizer_type="NullTokenizer", vocab_size=cfg.model.vocab_size,
        data_path=["/elsewhere/corpus_text_document"], split="98,1,1", micro_batch_size=1, global_batch_size=dp,
        train_iters=100, seed=1, eval_interval=50, eval_iters=1, consumed_train_samples=7 * dp,
        consumed_train_tokens=7 * dp * m.seq_length, ds_pipeline_enabled=False, fp16=False, bf16=False)
    per_layer = {"input_norm.weight": "input_layernorm.weight", "attention.qkv.weight":
                 "self_attention.query_key_value.weight", "attention.proj.weight": "self_attention.dense.weight",
                 "post_attention_norm.weight": "post_attention_layernorm.weight",
                 "mlp.fc2.weight": "mlp.dense_4h_to_h.weight"}
    for t_rank in range(tp):
        flat = OrderedDict()
        flat["language_model.embedding.word_embeddings.weight"] = \
            tensors["embedding.word_embeddings.weight"].chunk(tp)[t_rank]
        flat["language_model.embedding.position_embeddings.weight"] = tensors["embedding.position_embeddings.weight"]
        for i in range(m.num_layers):
            p = f"language_model.encoder.layers.{i}."
            for ours, theirs in per_layer.items():
                flat[p + theirs] = shard(ours, tensors[f"layers.{i}.{ours}"])
            flat[p + "mlp.dense_h_to_4h.weight"] = torch.cat([tensors[f"layers.{i}.mlp.gate.weight"].chunk(tp)[t_rank],
                                                               tensors[f"layers.{i}.mlp.fc1.weight"].chunk(tp)[t_rank]])
        flat["language_model.encoder.final_layernorm.weight"] = tensors["final_norm.weight"]
        flat["language_model.output_layer.weight"] = tensors["output_layer"].chunk(tp)[t_rank]
        groups = [OrderedDict((k, v) for k, v in flat.items() if v.ndim > 1),
                  OrderedDict((k, v) for k, v in flat.items() if v.ndim == 1)]
        module = {"language_model": {"embedding": {"word_embeddings": {"weight": flat[
            "language_model.embedding.word_embeddings.weight"]}, "position_embeddings": {"weight": flat[
                "language_model.embedding.position_embeddings.weight"]}},
            "encoder": {k.removeprefix("language_model.encoder."): v for k, v in flat.items() if ".encoder." in k},
            "output_layer": {"weight": flat["language_model.output_layer.weight"]}}}
        torch.save({"module": module, "args": argparse.Namespace(**{**vars(args), "rank": t_rank}), "iteration": 7,
                    "checkpoint_version": 3.0, "dp_world_size": dp,
                    "param_shapes": [OrderedDict((k, v.shape) for k, v in g.items()) for g in groups]},
                   d / f"mp_rank_{t_rank:02d}_model_states.pt")
        flats = [torch.cat([v.reshape(-1) for v in g.values()]) for g in groups]
        flats = [torch.cat([f, f.new_zeros(-f.numel() % dp + 1)]) for f in flats]   # DeepSpeed's end padding
        flats = [torch.cat([f, f.new_zeros(-f.numel() % dp)]) for f in flats]
        for r in range(dp):
            parts = [f.chunk(dp)[r].clone() for f in flats]
            state = {g: {"step": torch.tensor(7.0), "exp_avg": 2 * p, "exp_avg_sq": 3 * p * p}
                     for g, p in enumerate(parts)}
            torch.save({"optimizer_state_dict": {
                "single_partition_of_fp32_groups": parts,
                "base_optimizer_state": {"state": state, "param_groups": [{"decoupled_weight_decay": True}] * 2}}},
                d / f"zero_pp_rank_{r}_mp_rank_{t_rank:02d}_optim_states.pt")


def test_a_llama_style_run_comes_back_whole(tmp_path):
    """RMSNorm, SwiGLU, grouped-query attention, RoPE with learned positions, untied head, no biases, at TP2 x DP2
    with padded ZeRO partitions (no param_slice_mappings: derived from param_shapes): the imported gpt3d
    checkpoint holds exactly the tensors the shards were cut from, masters and moments included."""
    from gpt3d.checkpoint.reshard import ShardReader
    from gpt3d.checkpoint.full_model import read_model_tensors
    from gpt3d.model.build import build_full_model
    cfg = Config.from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "seq_length": 16, "vocab_size": 61,
                                      "normalization": "rmsnorm", "swiglu": True, "disable_bias_linear": True,
                                      "use_rotary_position_embeddings": True, "add_position_embedding": True,
                                      "untie_embeddings_and_output_weights": True, "padded_vocab_size": 64,
                                      "make_vocab_size_divisible_by": 8}})
    model = build_full_model(cfg.model, 64)
    model.init_weights(3)
    tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
    _write_mds_llama(tmp_path / "mds", tensors, cfg, 64, tp=2, dp=2)
    out = importer.import_checkpoint(str(tmp_path / "mds"), str(tmp_path / "gpt3d"))
    path, meta, got = read_model_tensors(str(tmp_path / "gpt3d"))
    assert meta["iteration"] == 7 and meta["consumed_samples"] == 14 and out["layout"] == "TP=2 PP=1 DP=2"
    assert set(got) == set(tensors)
    for n, t in tensors.items():
        assert torch.equal(got[n], t), n
    reader = ShardReader(path, meta)
    for n, t in tensors.items():
        for kind, want in (("master", t), ("exp_avg", 2 * t), ("exp_avg_sq", 3 * t * t)):
            assert torch.equal(reader.optim_tensor(n, kind), want), (n, kind)
    settings = meta["config"]["model"]
    assert settings["add_position_embedding"] and settings["num_key_value_heads"] == 2
    assert meta["config"]["optimizer"]["decoupled_weight_decay"] is True and reader.step == 7
    # and it trains on from there, with the settings the import wrote out (on synthetic tokens here)
    from gpt3d.cli import main as cli_main
    log = tmp_path / "m.jsonl"
    assert cli_main(["train", "--config", out["config"], "--load", str(tmp_path / "gpt3d"), "--mock-data",
                     "--override-data-state", "--train-iters", "9", "--log-interval", "1", "--log-file", str(log),
                     "--device", "cpu", "--tensor-model-parallel-size", "1"]) == 0
    import json
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == [8, 9] and all(math.isfinite(r["loss"]) for r in rows
                                                                           if "loss" in r)
