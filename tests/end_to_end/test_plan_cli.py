"""`gpt3d plan`: the ranked table, --json, errors in one line, and the model's behaviour across layouts.

The numbers' ground truth is elsewhere (tests/distributed/test_plan_memory/activations/schedule on
CPU, benchmarks/plan_check.py on a GPU); here: every proposed layout is one
`gpt3d train` accepts, the ranking and the struck-out rows follow the
predictions, and each knob moves memory and time the way gpt3d's code does.
"""
from __future__ import annotations

import json
import re

import pytest

from gpt3d.cli import main
from gpt3d.config import Config
from gpt3d.errors import ConfigError
from gpt3d.plan import check_memory, plan, predict
from gpt3d.plan.layout import Candidate, apply_layout
from gpt3d.plan.presets import (GIB, calibration_to_json, load_calibration, measured_calibration, resolve_gpu)
from gpt3d.plan.schedule import bubble_fraction
from gpt3d.plan.search import predict_layout

from tests.support import ROOT

GPT13B = str(ROOT / "configs" / "gpt-13B.yaml")


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def plan_13b_64():
    import yaml
    from gpt3d.config import apply_flat, flatten
    cfg = Config()
    apply_flat(cfg, flatten(yaml.safe_load(open(GPT13B))))
    return cfg, plan(cfg, 64, "h100-80gb", 8, micro_batch_sizes=[1, 2, 4])


def test_every_layout_is_one_gpt3d_accepts_and_the_ranking_follows_the_predictions(plan_13b_64):
    cfg, preds = plan_13b_64
    assert len(preds) > 50
    for p in preds:
        apply_layout(cfg, p.layout).validate(64)          # raises if `gpt3d train` would refuse it
        assert p.layout.world == 64 and p.layout.mbs * p.layout.num_micro * p.layout.dp == 1024
        assert p.fits == (p.peak_bytes <= p.usable_bytes)
    speeds = [p.tokens_per_s for p in preds]
    assert speeds == sorted(speeds, reverse=True)
    assert any(p.fits for p in preds) and any(not p.fits for p in preds)


def test_table_marks_the_configs_layout_and_strikes_out_what_does_not_fit(capsys):
    rc, out, err = _run(capsys, "--config", GPT13B, "--gpus", "64", "--gpus-per-node", "8", "--gpu", "h100-80gb",
                        "--micro-batch-sizes", "1", "8", "--top", "5")
    assert rc == 0 and not err
    lines = out.splitlines()
    assert "40L/5120h/40 heads" in lines[0] and "64 GPUs, 8 per node" in lines[0]
    mine = [ln for ln in lines if "<- the config's layout" in ln]
    assert len(mine) == 1 and "TP4 PP8 DP2 mb1x512" in mine[0] and "full-recompute" in mine[0]
    head = next(i for i, ln in enumerate(lines) if "step s" in ln)   # after the summary, GPU and note lines
    assert head == 2 + sum(ln.startswith("  note: ") for ln in lines[:head])
    step, tokens_per_s = re.search(r" (\d+\.\d{3}) +([\d,]+) ", mine[0]).groups()   # step s, tok/s columns
    assert float(step) * float(tokens_per_s.replace(",", "")) == pytest.approx(1024 * 2048, rel=1e-3)
    struck = [ln for ln in lines if "(does not fit)" in ln]
    assert struck and all(ln.startswith("~~") and ">73" in ln for ln in struck)   # memory > usable, shown
    fitting = [ln for ln in lines[head + 2:] if re.match(r" +\d+  TP", ln) and "<-" not in ln]
    assert len(fitting) == 5


SMALL = ["--num-layers", "8", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "512",
         "--max-position-embeddings", "512", "--global-batch-size", "16", "--micro-batch-size", "2", "--mock-data",
         "--train-iters", "1", "--gpu", "h100", "--micro-batch-sizes", "2", "--json"]


@pytest.mark.parametrize("gpus,flags", [
    (1, ["--zero-stage", "0"]),   # the search runs ZeRO 1 at DP 1 (the same run: the key compares effect)
    (2, ["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-split", "3,5"]),
    (1, ["--recompute-granularity", "full", "--recompute-num-layers", "3"]),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"])])
def test_the_configs_own_layout_is_predicted_with_what_the_search_does_not_vary(capsys, gpus, flags):
    """A layout `gpt3d train` runs is predicted and marked as the config's, whatever the search's ranges."""
    rc, out, _ = _run(capsys, *SMALL, "--gpus", str(gpus), *flags)
    doc = json.loads(out)
    own = Candidate(**doc["config_layout"])
    assert rc == 0 and doc["config_layout_refused"] is None
    assert [Candidate(**r["layout"]).key() for r in doc["layouts"]].count(own.key()) == 1
    rc, out, _ = _run(capsys, *SMALL[:-1], "--gpus", str(gpus), *flags)
    assert rc == 0 and sum("<- the config's layout" in ln and own.label() in ln for ln in out.splitlines()) == 1


@pytest.mark.parametrize("run", [[], ["--train-samples", "1600"], ["--train-tokens", "819200"]])
def test_a_plan_needs_no_run_length_nor_data_and_takes_any_kind(capsys, run):
    """The config's own layout is judged as training would judge its layout, not its run length or data files:
    with no length, or a length in samples (every layout was refused: the plan added --train-iters beside it)."""
    small = [f for f in SMALL if f not in ("--mock-data", "--train-iters", "1")]
    rc, out, _ = _run(capsys, *small, "--gpus", "1", "--data-path", "no/such/corpus", *run)
    doc = json.loads(out)
    assert rc == 0 and doc["config_layout_refused"] is None and doc["layouts"]


@pytest.mark.parametrize("per_stage", [3, 5, 6])
def test_a_config_train_refuses_is_said_refused_not_marked_on_a_rounded_layout(capsys, per_stage):
    """Layers per virtual stage that do not divide the stage's layers: `gpt3d train` refuses the config, so the
    plan says why instead of marking the layout the rounding would give."""
    flags = ["--gpus", "2", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
             str(per_stage)]
    with pytest.raises(ConfigError):
        Config.from_dict({"num_layers": 8, "hidden_size": 256, "num_attention_heads": 4, "seq_length": 512,
                          "global_batch_size": 16, "micro_batch_size": 2, "mock_data": True, "train_iters": 1,
                          "pipeline_model_parallel_size": 2,
                          "num_layers_per_virtual_pipeline_stage": per_stage}).validate(2)
    rc, out, _ = _run(capsys, *SMALL, *flags)
    assert rc == 0 and "divisible" in json.loads(out)["config_layout_refused"]
    rc, out, _ = _run(capsys, *SMALL[:-1], *flags)
    assert "<- the config's layout" not in out and "the config's own layout is not valid for these GPUs: " in out


def _figures(capsys, *flags) -> tuple:
    rc, out, _ = _run(capsys, *SMALL, "--gpus", "1", *flags)
    doc = json.loads(out)
    assert rc == 0
    return [(r["label"], r["peak_gib"], r["tokens_per_s"]) for r in doc["layouts"]], doc["notes"]


@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("padded", [None, 70_000])
def test_the_plan_builds_the_vocabulary_training_would(capsys, hf_bpe, spm_model, kind, padded):
    """--padded-vocab-size, else the tokenizer's (train/loop.py's rule, tokenizers/factory.model_vocab_size): the
    plan's memory and speed are those of the model `gpt3d train` builds (it took 50,257 whatever the tokenizer,
    and ignored --padded-vocab-size)."""
    from gpt3d.tokenizers.factory import build_tokenizer
    from tests.support.textgen import tokenizer_flags
    flags = tokenizer_flags(kind, hf_bpe, spm_model)
    size = padded or build_tokenizer(None, None, tokenizer_type=flags[1], tokenizer_model=flags[3]).vocab_size
    extra = ["--padded-vocab-size", str(padded)] if padded else []
    real = [f for f in SMALL if f != "--mock-data"]
    rc, out, _ = _run(capsys, *real, "--gpus", "1", *flags, *extra)
    got = [(r["label"], r["peak_gib"], r["tokens_per_s"]) for r in json.loads(out)["layouts"]]
    assert rc == 0 and got == _figures(capsys, "--vocab-size", str(size))[0]
    assert got != _figures(capsys, "--vocab-size", str(size + 4096))[0]


def test_a_tokenizer_not_readable_here_is_said_in_a_note(capsys):
    real = [f for f in SMALL if f != "--mock-data"]
    rc, out, _ = _run(capsys, *real, "--gpus", "1", "--vocab-file", "no/such/vocab.json", "--merge-file", "m.txt")
    doc = json.loads(out)
    assert rc == 0 and any("vocabulary taken as 50,257" in n and "no/such/vocab.json" in n for n in doc["notes"])
    assert [(r["label"], r["tokens_per_s"]) for r in doc["layouts"]] == [(a, c) for a, _, c in _figures(capsys)[0]]


def test_the_table_leads_with_the_fastest_layouts_that_fit(capsys, plan_13b_64):
    """Issue 26: the 13B example's first 15 rows used to be struck out (the first layout that fits was row 79).
    Now: the `--top` fastest that fit, ranked 1.. among those, then the config's own, then `--show-unfit` struck
    ones, fastest first; model and hardware TFLOPs are two labelled columns."""
    cfg, preds = plan_13b_64
    args = ["--config", GPT13B, "--gpus", "64", "--gpus-per-node", "8", "--gpu", "h100-80gb",
            "--micro-batch-sizes", "1", "2", "4"]
    rc, out, _ = _run(capsys, *args, "--top", "4", "--show-unfit", "2")
    rows = [ln for ln in out.splitlines() if re.match(r"(~~)? +(\d+|-)  TP", ln)]
    labels = [re.search(r"(TP\d.*?ZeRO\d)", ln).group(1) for ln in rows]
    fit, unfit = [p for p in preds if p.fits], [p for p in preds if not p.fits]
    own = next(i for i, p in enumerate(fit) if "<- the config's layout" in rows[4] and p.layout.label() == labels[4])
    assert rc == 0 and own >= 4
    assert labels == [p.layout.label() for p in fit[:4] + [fit[own]] + unfit[:2]]
    assert [ln.split()[0] for ln in rows[:5]] == ["1", "2", "3", "4", str(own + 1)]
    assert not any("(does not fit)" in ln for ln in rows[:5]) and all("(does not fit)" in ln for ln in rows[5:])
    head = next(ln for ln in out.splitlines() if "step s" in ln)
    assert "model TFLOPs" in head and "hw TFLOPs" in head and "counts recomputed work" in out
    for p in preds:   # the two figures: the model's FLOPs (MFU's numerator), and the formula counting recompute
        assert p.mfu == pytest.approx(p.model_tflops_per_gpu / 989.0)
        if p.layout.recompute is not None:
            assert p.tflops_per_gpu > p.model_tflops_per_gpu
    rc, out, _ = _run(capsys, *args, "--top", "4", "--show-unfit", "0")
    assert "(does not fit)" not in out and "layouts do not fit: --show-unfit N lists the fastest" in out


def test_json_lists_every_layout_with_memory_and_time_terms(capsys):
    rc, out, _ = _run(capsys, "--config", GPT13B, "--gpus", "128", "--micro-batch-sizes", "1", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["gpus"] == 128 and doc["config_layout"]["tp"] == 4 and doc["config_layout"]["dp"] == 4
    rows = doc["layouts"]
    assert rows and all(r["layout"]["tp"] * r["layout"]["pp"] * r["layout"]["dp"] == 128 for r in rows)
    for r in rows[:20]:
        mem = r["memory_gib"]
        assert {"parameters", "gradient buffer", "fp32 masters", "Adam moments", "activations"} <= set(mem)
        assert abs(sum(mem.values()) - r["peak_gib"]) < 1e-6
        assert r["fits"] == (r["peak_gib"] <= r["usable_gib"])
        assert r["tokens_per_s"] == pytest.approx(1024 * 2048 / r["step_s"])


@pytest.mark.parametrize("args,message", [
    (["--gpu", "tpu-v5"], "gpt3d: error: unknown --gpu 'tpu-v5'"),
    (["--gpu", "custom", "--gpu-tflops", "500"], "gpt3d: error: --gpu custom needs --gpu-memory-gib"),
    (["--gpus", "3"], "gpt3d: error: no layout of 3 GPUs"),
    (["--calibration", "/nonexistent/cal.json"], "gpt3d: error: cannot read calibration /nonexistent/cal.json"),
])
def test_bad_input_is_one_error_line(capsys, args, message):
    rc, out, err = _run(capsys, "--config", GPT13B, "--gpus", "64", *args)
    assert rc == 2 and not out and len(err.strip().splitlines()) == 1 and err.startswith(message), err


def test_custom_gpu_and_calibration_files(tmp_path, capsys):
    cal = resolve_gpu("a100-80gb").calibration
    assert cal.gemm_tflops < resolve_gpu("h100").calibration.gemm_tflops    # scaled by peak FLOPs
    path = tmp_path / "cal.json"
    rc, _, _ = _run(capsys, "--config", GPT13B, "--gpus", "32", "--gpu", "custom", "--gpu-tflops", "400",
                    "--gpu-memory-gib", "48", "--hbm-gbps", "2000", "--nvlink-gbps", "200", "--ib-gbps", "25",
                    "--micro-batch-sizes", "1", "--save-calibration", str(path), "--json")
    h100 = resolve_gpu("h100").calibration
    assert rc == 0 and load_calibration(str(path)).gemm_tflops == pytest.approx(h100.gemm_tflops * 400 / 989)
    assert load_calibration(str(path)).ew_gbps == pytest.approx(h100.ew_gbps * 2000 / 3350)
    md = tmp_path / "log.md"
    md.write_text("text\n<!-- plan-calibration " + calibration_to_json(cal) + " -->\n")
    assert load_calibration(str(md)).gemm_tflops == cal.gemm_tflops
    assert measured_calibration().source.startswith("measured on NVIDIA H100")   # --calibrate without a GPU


@pytest.mark.parametrize("gpu", ["h100", "a100", "h200"])
def test_calibrate_without_a_gpu_predicts_what_the_preset_does(capsys, monkeypatch, gpu):
    """One home for the H100's kernel speeds: the H100 preset is the packaged calibration, in the cost curves'
    terms (the packaged file once held the 1.3B shape's raw GEMM and attention rates, which predicted 1.3B 8.6%
    slower than the preset), and `--calibrate` without a GPU takes the preset's figures (H100's scaled to it)."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_gpu("h100").calibration == measured_calibration()
    rows = []
    for extra in ([], ["--calibrate"]):
        rc, out, _ = _run(capsys, "--config", str(ROOT / "configs" / "gpt-1.3B.yaml"), "--gpus", "1", "--gpu",
                          gpu, "--compile", "--micro-batch-sizes", "8", "--json", *extra)
        assert rc == 0
        rows.append([(r["label"], r["tokens_per_s"]) for r in json.loads(out)["layouts"]])
    assert rows[0] and rows[0] == rows[1]


def test_check_memory_refuses_a_layout_predicted_not_to_fit():
    cfg = Config.from_dict({"num_layers": 40, "hidden_size": 5120, "num_attention_heads": 40, "seq_length": 2048,
                            "micro_batch_size": 1, "global_batch_size": 8, "bf16": True, "mock_data": True,
                            "train_iters": 1, "compile": True})
    with pytest.raises(ConfigError, match="predicted to need .* GiB per GPU"):
        check_memory(cfg, 8, "h100-80gb")        # 13B on each of 8 GPUs (DP only): ~200 GiB of states
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = 4, 2
    assert check_memory(cfg, 8, "h100-80gb").fits


def test_fp8_memory_is_said_unmodelled_wherever_figures_are_shown(capsys):
    """--fp8 is in the time model but not the memory model: the memory figures are bf16's, and the table, the
    JSON, train's prediction line and --check-memory's refusal say so; without --fp8 none of them carries a
    note."""
    from gpt3d.plan.advice import Advice
    from gpt3d.plan.search import measured_line, startup_line
    base = {"num_layers": 40, "hidden_size": 5120, "num_attention_heads": 40, "seq_length": 2048,
            "micro_batch_size": 1, "global_batch_size": 8, "bf16": True, "mock_data": True, "train_iters": 1,
            "compile": True}
    note = "--fp8 memory is not modelled: it is bf16's"
    for fp8 in (False, True):
        cfg = Config.from_dict({**base, "fp8": fp8})
        p = predict(cfg, 8, "h100-80gb")
        assert (note in startup_line(p)) is fp8 and bool(p.notes) is fp8 and (p.as_dict()["notes"] != []) is fp8
        assert (note in measured_line(p, 1.0, 1.0)) is fp8 and (note in Advice(p, p, []).line()) is fp8
        with pytest.raises(ConfigError) as e:
            check_memory(cfg, 8, "h100-80gb")     # 13B on each of 8 GPUs does not fit
        assert (note in str(e.value)) is fp8
        flags = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128",
                 "--max-position-embeddings", "128", "--global-batch-size", "8", "--bf16"] + (["--fp8"] if fp8 else [])
        rc, out, _ = _run(capsys, *flags, "--gpus", "2")
        assert rc == 0 and (f"note: {note}" in out) is fp8
        rc, out, _ = _run(capsys, *flags, "--gpus", "2", "--json")
        doc = json.loads(out)
        assert rc == 0 and (note in " ".join(doc["notes"])) is fp8
        assert all((note in " ".join(r["notes"])) is fp8 for r in doc["layouts"])
    fp8 = predict(Config.from_dict({**base, "fp8": True}), 8, "h100-80gb")
    bf16 = predict(Config.from_dict(base), 8, "h100-80gb")
    assert fp8.peak_bytes == bf16.peak_bytes and fp8.tokens_per_s > bf16.tokens_per_s   # memory bf16's, time not


@pytest.mark.parametrize("shape", [
    dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=512, micro_batch_size=8, vocab_size=256),
    # two stages whose order differs with and without the FP8 discount (the head's large vocabulary on the last)
    dict(num_layers=8, hidden_size=2048, num_attention_heads=16, seq_length=2048, micro_batch_size=2,
         vocab_size=200000, pipeline_model_parallel_size=2)])
def test_fp8_is_refused_as_impossible_only_beyond_what_fp8_could_save(monkeypatch, shape):
    """fits.py refuses a layout whose predicted peak on some stage exceeds the whole device memory; with --fp8
    (whose memory is not modelled) only beyond what FP8 could ever save, half of each stage's activations, and
    the refusal says so."""
    from gpt3d.parallel.state import ParallelState
    from gpt3d.plan import fits
    from gpt3d.plan.memory import plan_memory
    seen = []
    monkeypatch.setattr(fits, "plan_memory", lambda *a, **k: seen.append(plan_memory(*a, **k)) or seen[-1])
    pp = shape.get("pipeline_model_parallel_size", 1)

    def refused(fp8: bool, have: float):
        cfg = Config.from_dict({**shape, "global_batch_size": 4, "bf16": True, "fp8": fp8, "mock_data": True,
                                "train_iters": 1, "compile": True})
        monkeypatch.setattr(fits, "device_memory", lambda device: have)   # this rank's device: the CPU here
        try:
            fits.refuse_what_cannot_fit(cfg, ParallelState(pp=pp), shape["vocab_size"])
        except ConfigError as e:
            return str(e)
        return None
    stages = {}
    for fp8 in (False, True):   # FP8 compiles per layer (model/build.compile_granularity): its own prediction
        assert refused(fp8, 1e15) is None
        stages[fp8] = seen[-1]
        assert len(stages[fp8]) == pp and all(s.breakdown()["activations"] > 0 for s in stages[fp8])
    need = {False: max(s.peak for s in stages[False]),
            True: max(s.peak - 0.5 * s.breakdown()["activations"] for s in stages[True])}
    if pp > 1:   # the FP8 verdict is not the busiest stage's, discounted
        busiest = max(stages[True], key=lambda s: s.peak)
        assert need[True] > busiest.peak - 0.5 * busiest.breakdown()["activations"]
    for fp8 in (False, True):
        assert refused(fp8, need[fp8] * (1 + 1e-9)) is None
        msg = refused(fp8, need[fp8] * (1 - 1e-9))
        assert msg is not None and "could never run" in msg and ("--fp8 memory is not modelled" in msg) is fp8
    assert need[True] < need[False]


def _one(cfg, **kw) -> object:
    base = dict(tp=1, pp=1, dp=1, mbs=4, num_micro=8)
    return predict_layout(cfg, Candidate(**{**base, **kw}), resolve_gpu("h100-80gb"), 8)


@pytest.fixture(scope="module")
def cfg_1b():
    return Config.from_dict({"num_layers": 24, "hidden_size": 2048, "num_attention_heads": 16, "seq_length": 2048,
                             "vocab_size": 50257, "bf16": True, "mock_data": True, "train_iters": 1,
                             "compile": True, "micro_batch_size": 4, "global_batch_size": 32})


def test_each_knob_moves_memory_and_time_as_gpt3d_does(cfg_1b):
    none, sel, full = (_one(cfg_1b, recompute=r) for r in (None, "selective", "full"))

    def act(p):
        return p.memory["activations"]
    assert act(full) < 0.2 * act(none) and act(sel) <= act(none)
    assert full.time.seconds > none.time.seconds
    z0, z1 = _one(cfg_1b, dp=4, mbs=4, num_micro=2, zero=0), _one(cfg_1b, dp=4, mbs=4, num_micro=2, zero=1)
    assert z1.memory["Adam moments"] == pytest.approx(z0.memory["Adam moments"] / 4, rel=0.01)
    assert z1.memory["parameters"] == pytest.approx(z0.memory["parameters"], rel=0.01)
    tp, tp_sp = _one(cfg_1b, tp=4, dp=1), _one(cfg_1b, tp=4, dp=1, sp=True)
    assert act(tp_sp) < act(tp) < act(none)
    assert tp.time.parts["TP communication"] > 0 and "TP communication" not in none.time.parts
    pp4, pp4v = _one(cfg_1b, pp=4, num_micro=8), _one(cfg_1b, pp=4, num_micro=8, vp=2)
    assert pp4.time.parts["pipeline bubble"] == pytest.approx(
        bubble_fraction(4, 1, 8) * 8 * max(pp4.time.stage_seconds), rel=0.35)   # uneven stages: first/last heavier
    assert pp4v.time.parts["pipeline bubble"] < pp4.time.parts["pipeline bubble"]
    assert pp4.busiest_stage == 0 and [s.in_flight for s in pp4.stages] == pytest.approx([4, 3, 2, 1], rel=0.05)


def test_small_shapes_pay_matmul_overhead_short_attention_and_the_host_floor():
    """The H200 findings the time model carries (benchmarks/RESULTS.md 2026-12-02): per token, small matmuls
    and short sequences cost more; gradient hooks cost every micro-batch (where there is a buffer); and a small
    model at a small micro-batch waits on the host's launches, however fast its kernels."""
    from gpt3d.plan.presets import attention_efficiency
    assert attention_efficiency(1024, 128) < attention_efficiency(4096, 128) < 1.0
    assert attention_efficiency(2048, 80) < attention_efficiency(2048, 64) < attention_efficiency(2048, 128)   # TFLOP/s
    # head sizes above 64 run 128-wide kernels (H100, 2026-12-07): 80 takes 0.88x of 128's time, not 80/128
    time_80 = (80 / attention_efficiency(2048, 80)) / (128 / attention_efficiency(2048, 128))
    assert time_80 == pytest.approx(0.88, abs=0.01)
    for hd in range(1, 513):   # no head size beats 128's rate (none above 128 was measured), none is free
        assert 0 < attention_efficiency(2048, hd) <= attention_efficiency(2048, 128)
    small = Config.from_dict({"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "seq_length": 1024,
                              "vocab_size": 50257, "bf16": True, "mock_data": True, "train_iters": 1,
                              "compile": True, "micro_batch_size": 1, "global_batch_size": 1})
    tiny = predict_layout(small, Candidate(tp=1, pp=1, dp=1, mbs=1, num_micro=1), resolve_gpu("h200"), 8)
    big = predict_layout(small, Candidate(tp=1, pp=1, dp=1, mbs=16, num_micro=1), resolve_gpu("h200"), 8)
    assert tiny.time.parts["host launch (GPU idle)"] > 0 and "host launch (GPU idle)" not in big.time.parts
    assert tiny.tokens_per_s < 0.25 * big.tokens_per_s
    cal = resolve_gpu("h200").calibration
    assert tiny.time.seconds == pytest.approx(12 * cal.host_layer_s + cal.host_step_s)
    acc = [predict_layout(small, Candidate(tp=1, pp=1, dp=1, mbs=16, num_micro=m), resolve_gpu("h200"), 8)
           for m in (1, 4)]
    # one micro-batch at DP 1: the optimizer reads autograd's gradients, nothing to accumulate (direct gradients)
    assert "gradient accumulation" not in acc[0].time.parts and acc[1].time.parts["gradient accumulation"] > 0


def test_predict_uses_the_configs_own_layout(cfg_1b):
    cfg_1b.parallel.tensor_model_parallel_size, cfg_1b.parallel.pipeline_model_parallel_size = 2, 2
    p = predict(cfg_1b, 8, "h100")
    assert (p.layout.tp, p.layout.pp, p.layout.dp, p.layout.num_micro) == (2, 2, 2, 4)
    assert p.peak_bytes / GIB < 40 and p.tokens_per_s > 0


def test_train_predicts_on_cuda_only_and_check_memory_refuses_before_allocating(monkeypatch):
    import torch

    from gpt3d.parallel.state import ParallelState
    from gpt3d.plan import search
    cfg = Config.from_dict({"num_layers": 40, "hidden_size": 5120, "num_attention_heads": 40, "seq_length": 2048,
                            "micro_batch_size": 1, "global_batch_size": 8, "bf16": True, "mock_data": True,
                            "train_iters": 1, "compile": True, "check_memory": True})
    assert search.for_run(cfg, ParallelState(dp=8), 50257) is None          # CPU runs: no prediction
    monkeypatch.setattr(search, "gpu_for_device", lambda device: resolve_gpu("h100-80gb"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    on_gpus = ParallelState(dp=8, device=torch.device("cuda"))               # no CUDA call is made
    with pytest.raises(ConfigError, match="predicted to need .* GiB per GPU"):
        search.for_run(cfg, on_gpus, 50257)
    cfg.training.check_memory = False
    p = search.for_run(cfg, on_gpus, 50257)
    assert not p.fits and p.layout.dp == 8


def test_train_prints_the_prediction_then_the_measured_figures(monkeypatch, capsys):
    """The train loop's wiring, on CPU: a prediction stands in for the GPU's (see for_run)."""
    import torch

    import gpt3d.train.loop as loop
    from tests.support.curves import tiny_config
    from gpt3d.parallel.state import ParallelState
    cfg = tiny_config(train_iters=3, log_interval=1, eval_iters=0)
    pred = predict(cfg, 1, "h100-80gb")
    monkeypatch.setattr(loop, "plan_for_run", lambda cfg, ps, vocab_size, gpu=None: pred)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * GIB)
    assert loop.Trainer(cfg, ParallelState.single()).run() == 0
    lines = capsys.readouterr().out.splitlines()
    start = [i for i, ln in enumerate(lines) if ln.startswith("gpt3d plan: predicted")]
    measured = [i for i, ln in enumerate(lines) if ln.startswith("gpt3d plan: measured")]
    iters = [i for i, ln in enumerate(lines) if ln.startswith("iter ")]
    header = [i for i, ln in enumerate(lines) if ln.startswith("gpt3d: TP=")]   # the start-up header comes first
    assert len(start) == 1 and header and header[0] < start[0] < iters[0]
    assert len(iters) == 3 and measured == [iters[1] - 1]                    # once, at the second log line
    assert "measured 3.0 GiB peak" in lines[measured[0]] and pred.layout.label() in lines[start[0]]
