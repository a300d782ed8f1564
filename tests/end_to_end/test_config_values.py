"""Bad values fail before any work with one `gpt3d: error:` line and exit 2; every command's user errors exit 2.

Each row goes through `gpt3d train` in this process: the run would write a metrics file and a checkpoint
into tmp_path, so an untouched tmp_path shows nothing started.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os

import re

import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d import cli
from gpt3d.config import SECTIONS, field_types, flag_name, optional_fields

from tests.support import ROOT, runs

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")   # @record under capsys

BASE = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--vocab-size", "256", "--micro-batch-size", "2", "--device", "cpu",
        "--no-exit-signal-handler"]

BAD_VALUES = [
    # zero iterations / tokens
    (["--train-iters", "0"], "--train-iters must be positive, got 0"),
    (["--train-iters", "-3"], "--train-iters must be positive, got -3"),
    (["--train-tokens", "0"], "--train-tokens must be positive, got 0"),
    # epsilons: NaN, inf, zero, negative
    (["--adam-eps", "nan"], "--adam-eps must be a finite number, got nan"),
    (["--adam-eps", "inf"], "--adam-eps must be a finite number, got inf"),
    (["--adam-eps", "0"], "--adam-eps must be positive, got 0.0"),
    (["--adam-eps=-1e-8"], "--adam-eps must be positive, got -1e-08"),
    (["--layernorm-epsilon", "nan"], "--layernorm-epsilon must be a finite number, got nan"),
    (["--layernorm-epsilon", "0"], "--layernorm-epsilon must be positive, got 0.0"),
    # learning rate, betas, decay, clipping
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr=-1e-3"], "--lr must be non-negative, got -0.001"),
    (["--min-lr", "nan"], "--min-lr must be a finite number, got nan"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "need 0 <= --min-lr (0.001) <= --lr (0.0001)"),
    (["--adam-beta1", "nan"], "--adam-beta1 must be a finite number, got nan"),
    (["--adam-beta2", "1.0"], "--adam-beta2 must be in [0, 1), got 1.0"),
    (["--weight-decay=-inf"], "--weight-decay must be a finite number, got -inf"),
    (["--clip-grad", "nan"], "--clip-grad must be a finite number, got nan"),
    (["--clip-grad", "-1"], "--clip-grad must be non-negative, got -1.0"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1], got 1.5"),
    (["--lr-warmup-iters", "-1"], "--lr-warmup-iters must be non-negative, got -1"),
    (["--lr-decay-iters", "0"], "--lr-decay-iters must be positive, got 0"),
    # model
    (["--hidden-dropout", "nan"], "--hidden-dropout must be a finite number, got nan"),
    (["--attention-dropout", "1.0"], "--attention-dropout must be in [0, 1), got 1.0"),
    (["--init-method-std", "inf"], "--init-method-std must be a finite number, got inf"),
    (["--init-method-std", "0"], "--init-method-std must be positive, got 0.0"),
    (["--rotary-percent", "nan"], "--rotary-percent must be a finite number, got nan"),
    (["--num-key-value-heads", "0"], "--num-key-value-heads must be positive, got 0"),
    (["--vocab-size", "0"], "--vocab-size must be in [1, 2^31) (token ids are int32 in the .bin data), got 0"),
    # used to end in an out-of-memory traceback, exit 1
    (["--vocab-size", "100000000000"], "--vocab-size must be in [1, 2^31) (token ids are int32 in the .bin data), "
                                       "got 100000000000"),
    (["--vocab-size", "2147483647", "--hidden-size", "4096"], "a vocabulary of 2,147,483,647 ids (padded to "
                                                              "2,147,483,648) does not fit: its embedding alone"),
    (["--make-vocab-size-divisible-by", "1000000000000"], "(padded to 1,000,000,000,000) does not fit"),
    (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by must be positive, got 0"),
    # precision / loss scale
    (["--fp16", "--loss-scale", "nan"], "--loss-scale must be a finite number, got nan"),
    (["--fp16", "--loss-scale", "0"], "--loss-scale must be positive, got 0.0"),
    (["--initial-loss-scale", "inf"], "--initial-loss-scale must be a finite number, got inf"),
    (["--min-loss-scale", "0"], "--min-loss-scale must be positive, got 0.0"),
    (["--min-loss-scale", "1024", "--initial-loss-scale", "2"], "--min-loss-scale (1024.0) must not exceed"),
    (["--hysteresis", "0"], "--hysteresis must be positive, got 0"),
    (["--loss-scale-window", "0"], "--loss-scale-window must be positive, got 0"),
    # batch, data, run control
    (["--global-batch-size", "0"], "--global-batch-size must be positive, got 0"),
    (["--eval-iters", "-1"], "--eval-iters must be non-negative, got -1"),
    (["--num-workers", "-2"], "--num-workers must be in [0, 1024], got -2"),
    (["--seed", "-1"], "--seed must be in [0, 2^31), got -1"),
    (["--bucket-size-mb", "nan"], "--bucket-size-mb must be a finite number, got nan"),
    (["--bucket-size-mb", "0"], "--bucket-size-mb must be in (0, 1048576] (MiB), got 0.0"),
    (["--peak-tflops", "0"], "--peak-tflops must be positive, got 0.0"),
    (["--distributed-timeout-minutes", "inf"], "--distributed-timeout-minutes must be a finite number, got inf"),
    (["--exit-duration-in-mins", "nan"], "--exit-duration-in-mins must be a finite number, got nan"),
    (["--save-interval", "0"], "--save-interval must be positive, got 0"),
    (["--keep-last", "0"], "--keep-last must be positive, got 0"),
    (["--no-mock-data", "--data-path", "d", "--vocab-file", "v", "--merge-file", "m", "--split", "nan,1,0"],
     "bad --split 'nan,1,0'"),
    (["--no-mock-data", "--data-path", "d", "--vocab-file", "v", "--merge-file", "m", "--split", "0,1,0"],
     "--split '0,1,0' gives training no documents"),
    # impossible sizes used to end in an allocator traceback: refused from the memory prediction, before allocating
    (["--seq-length", "262144"], "could never run (--seq-length 262144"),
    (["--micro-batch-size", "100000000"], "could never run"),
    (["--global-batch-size", "1000000000000"], "could never run"),
    (["--hidden-size", "1048576"], "needs at least"),
    (["--global-batch-size", str(2 ** 62)], "exceed 2^63 tokens"),
    (["--distributed-timeout-minutes", "0.01"], "--distributed-timeout-minutes must be in [0.1, 1000000], got 0.01"),
    (["--num-workers", "100000"], "--num-workers must be in [0, 1024], got 100000"),
]


def _run_train(tmp_path, flags: list, capsys) -> tuple[int, list]:
    capsys.readouterr()
    rc = cli.main(["train", *BASE, "--log-file", str(tmp_path / "run" / "m.jsonl"), "--save", str(tmp_path / "ck"),
                   *flags])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flags,message", BAD_VALUES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_value_is_one_error_line_before_any_work(tmp_path, capsys, flags, message):
    rc, err = _run_train(tmp_path, ["--train-iters", "2", *flags], capsys)   # a later flag wins
    assert rc == 2 and len(err) == 1 and err[0].startswith("gpt3d: error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []   # no metrics file, no checkpoint directory


@pytest.mark.parametrize("yaml_text,message", [
    ("train_iters: 2\nlr: .nan\n", "--lr must be a finite number, got nan"),
    ("train_iters: 2\noptimizer:\n  adam_eps: .inf\n", "--adam-eps must be a finite number, got inf"),
    ("train_iters: 2\nlayernorm_epsilon: nan\n", "--layernorm-epsilon must be a finite number, got nan"),
    ("train_iters: .inf\n", "setting 'train_iters' expects int, got inf"),
    ("train_iters: 0\n", "--train-iters must be positive, got 0"),
    # wrong types used to train silently (num_layers: true trained one layer) or end in a traceback
    ("train_iters: 2\nnum_layers: true\n", "setting 'num_layers' expects int, got True"),
    ("train_iters: 2\nsplit: 100\n", "setting 'split' expects str, got 100 (in YAML, quote it: split: \"100\")"),
    ("train_iters: 2\npipeline_model_parallel_split: 2\n", "setting 'pipeline_model_parallel_split' expects str"),
    ("train_iters: 2\nsave: [a, b]\n", "setting 'save' expects str, got ['a', 'b']"),
    ("train_iters: 2\nmodel: 3\n", "section 'model' in"),
    ("train_iters: 2\n3: 4\n", "setting names in"),
    ("train_iters: 2\nnum_layers: null\n", "setting 'num_layers' needs a value (int), got null"),
])
def test_bad_value_in_yaml(tmp_path, capsys, yaml_text, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    rc, err = _run_train(tmp_path / "out", ["--config", str(tmp_path / "c.yaml")], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("gpt3d: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_run_that_can_do_no_iteration_is_refused(tmp_path, capsys):
    """--train-samples below one global batch used to exit 0 after 0 iterations, saving iter_0000000."""
    capsys.readouterr()
    assert cli.main(["train", *BASE, "--train-samples", "3", "--global-batch-size", "4", "--save",
                     str(tmp_path / "ck")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gpt3d: error: --train-samples 3 is less than one global batch (4 samples): the run would do no iteration"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags,warning", [
    (["--lr-warmup-iters", "500", "--train-iters", "5"], "the learning-rate warm-up (500 iterations) is longer "
     "than the run (5 iterations): its last step trains at lr 3e-06, 1.0% of --lr 0.0003"),
    # a seed config's 3B-token warm-up, tried for 20 iterations
    (["--lr-warmup-tokens", "3e9", "--train-iters", "20", "--global-batch-size", "4"], "the learning-rate warm-up "
     "(3,000,000,000 tokens) is longer than the run (1,280 tokens, 20 iterations): its last step trains at lr "
     "1.28e-10, 0.0% of --lr 0.0003"),
])
def test_a_warmup_longer_than_the_run_is_one_warning(capsys, flags, warning):
    """It used to train at lr ~1e-9 without a word. A warning, not a refusal: a short trial of a long run's settings
    is legitimate; the line says what learning rate the run reaches."""
    capsys.readouterr()
    assert cli.main(["train", *BASE, *flags]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [x for x in err if "warm-up" in x] == [f"gpt3d: warning: {warning} (shorten the warm-up or train longer)"]


def test_every_numeric_setting_has_a_rule():
    """A new int/float setting gets a range in config.rules.RULES (or fixed choices); NaN/inf are refused for all."""
    import dataclasses

    from gpt3d.config import SECTIONS
    from gpt3d.config.rules import RULES
    missing = [f.name for k in SECTIONS.values() for f in dataclasses.fields(k)
               if any(t in str(f.type) for t in ("int", "float")) and f.name not in RULES
               and not f.metadata.get("choices")]
    assert missing == []


def test_choices_hold_in_yaml_too(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train_iters: 2\nzero_stage: 3\nnormalization: batchnorm\n")
    rc, err = _run_train(tmp_path / "out", ["--config", str(tmp_path / "c.yaml")], capsys)
    assert rc == 2 and err == ["gpt3d: error: --normalization must be one of ['layernorm', 'rmsnorm'], "
                               "got 'batchnorm'"], err


def test_pipeline_split_that_is_not_numbers():
    from tests.support.curves import tiny_config

    from gpt3d.errors import ConfigError
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-split '2,x' must be comma-separated"):
        tiny_config(pipeline_model_parallel_size=2, pipeline_model_parallel_split="2,x").validate(world_size=2)


def test_bad_flag_values_exit_2(capsys):
    for flags, message in ([["--train-tokens", "inf"], "--train-tokens: expected a token count like 300e9"],
                           [["--num-layers", "two"], "--num-layers: invalid int value"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *BASE, "--train-iters", "2", *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err


def _user_error_cases(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "m.jsonl").write_text('{"tokens": 1}\n')
    missing = str(tmp_path / "missing")
    return [
        (["train", *BASE, "--train-iters", "1", "--log-file", str(tmp_path / "file" / "m.jsonl")],
         str(tmp_path / "file")),
        (["preprocess", "--input", missing, "--output-prefix", str(tmp_path / "out"), "--vocab-file", missing,
          "--merge-file", missing], "not found"),
        (["plot", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "c.png")], "no loss rows"),
        (["eval", "--load", missing, "--text-file", missing], missing),
        (["generate", "--load", missing, "--prompt", "hi"], missing),
        (["export-hf", "--load", missing, "--output", str(tmp_path / "hf")], missing),
        (["import-hf", "--input", missing, "--save", str(tmp_path / "ck")], missing),
        (["checkpoint-info", missing], missing),
    ]


def test_every_command_exits_2_on_user_error(tmp_path, capsys):
    for argv, message in _user_error_cases(tmp_path):
        capsys.readouterr()
        rc = cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err and err[-1].startswith("gpt3d: error: ") and message in err[-1], (argv[0], rc, err)
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"tokens": 1}


# ----- the numeric flags of the other commands: the same rules, the same one line, before any work -----------------
@pytest.fixture(scope="module")
def tiny_ck(tmp_path_factory):
    """A one-step checkpoint of the BASE model and 100 token ids as text for NullTokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    assert cli.main(["train", *BASE, "--train-iters", "1", "--save", str(root / "ck")]) == 0
    (root / "ids.txt").write_text(" ".join(str(i * 7 % 256) for i in range(100)))
    return root


EVAL = ["eval", "--tokenizer-type", "NullTokenizer", "--device", "cpu"]
GENERATE = ["generate", "--tokenizer-type", "NullTokenizer", "--device", "cpu", "--prompt", "1 2 3",
            "--max-new-tokens", "2"]
COMMAND_BAD_VALUES = [
    # eval: zero raised a ValueError traceback (exit 1); -1 scored 19 of 484 tokens, exit 0; --max-tokens -5 scored
    # fewer tokens; --max-tokens 0 and --seq-length 0 silently meant the default
    (EVAL + ["--micro-batch-size", "0"], "--micro-batch-size must be positive, got 0"),
    (EVAL + ["--micro-batch-size", "-1"], "--micro-batch-size must be positive, got -1"),
    (EVAL + ["--max-tokens", "-5"], "--max-tokens must be positive, got -5"),
    (EVAL + ["--max-tokens", "0"], "--max-tokens must be positive, got 0"),
    (EVAL + ["--seq-length", "0"], "--seq-length must be at least 2"),
    (EVAL + ["--seq-length", "1"], "--seq-length must be at least 2"),
    # generate: NaN temperature crashed in torch.multinomial; --seed -1 was accepted (train refuses it)
    (GENERATE + ["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (GENERATE + ["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (GENERATE + ["--temperature=-1"], "--temperature must be non-negative, got -1.0"),
    (GENERATE + ["--seed", "-1"], "--seed must be in [0, 2^31), got -1"),
    (GENERATE + ["--top-k", "-1"], "--top-k must be non-negative, got -1"),
    (GENERATE + ["--top-p", "nan"], "--top-p must be a finite number, got nan"),
    (GENERATE + ["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (GENERATE + ["--max-new-tokens", "-1"], "--max-new-tokens must be non-negative, got -1"),
]


@pytest.mark.parametrize("argv,message", COMMAND_BAD_VALUES, ids=lambda x: " ".join(x[-2:]) if isinstance(x, list)
                         else "")
def test_eval_and_generate_refuse_bad_numbers(tiny_ck, capsys, argv, message):
    capsys.readouterr()
    rc = cli.main([*argv, "--load", str(tiny_ck / "ck")] + (["--text-file", str(tiny_ck / "ids.txt")]
                                                            if argv[0] == "eval" else []))
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gpt3d: error: ") and message in err[0], err
    assert captured.out == ""


PLAN = ["plan", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "256", "--micro-batch-size", "2", "--global-batch-size", "4"]


@pytest.mark.parametrize("flags,message", [
    (["--gpus", "0"], "--gpus must be positive, got 0"),                   # was silently the default
    (["--gpu-tflops", "nan"], "--gpu-tflops must be a finite number, got nan"),   # was a table of nan% MFU
    (["--gpu-memory-gib", "inf"], "--gpu-memory-gib must be a finite number, got inf"),
    (["--ib-gbps", "nan"], "--ib-gbps must be a finite number, got nan"),
    (["--reserve-gib=-1"], "--reserve-gib must be non-negative, got -1.0"),       # was accepted
    (["--micro-batch-sizes", "0"], "--micro-batch-sizes must be positive, got 0"),  # ZeroDivisionError
    (["--micro-batch-sizes", "2", "-2"], "--micro-batch-sizes must be positive, got -2"),
    (["--top", "-1"], "--top must be non-negative, got -1"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be positive, got 0"),    # ZeroDivisionError
    (["--lr", "nan"], "--lr must be a finite number, got nan"),                     # "no layout fits"
    (["--vocab-size", "100000000000"], "--vocab-size must be in [1, 2^31)"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_plan_refuses_bad_numbers(tmp_path, capsys, flags, message):
    capsys.readouterr()
    rc = cli.main([*PLAN, "--save-calibration", str(tmp_path / "cal.json"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gpt3d: error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_import_hf_refuses_a_config_json_value_training_refuses(tiny_ck, tmp_path, capsys):
    """A NaN layer_norm_epsilon in config.json was imported as `layernorm_epsilon: .nan` in model.yaml."""
    hf = tmp_path / "hf"
    assert cli.main(["export-hf", "--load", str(tiny_ck / "ck"), "--output", str(hf),
                     "--tokenizer-type", "NullTokenizer"]) == 0
    config = json.loads((hf / "config.json").read_text())
    config["layer_norm_epsilon"] = float("nan")
    (hf / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli.main(["import-hf", "--input", str(hf), "--save", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gpt3d: error: {hf / 'config.json'}: a value gpt3d cannot train with: --layernorm-epsilon must "
                   "be a finite number, got nan"], err
    assert not (tmp_path / "ck").exists()


def test_a_tiny_temperature_is_greedy():
    """A positive temperature below ~1e-38 (0 in fp32) gave NaN probabilities and a torch traceback."""
    import torch

    from gpt3d.inference.generate import sample_next
    logits = torch.tensor([1.0, 3.0, 2.0, -50.0])
    for t in (1e-45, 1e-310, 5e-324):
        assert sample_next(logits, t, 0, 1.0, torch.Generator().manual_seed(0)) == 1
        assert sample_next(logits, t, 2, 0.5, torch.Generator().manual_seed(0)) == 1


def _numeric_flags(parser) -> set:
    """Dests of the int/float flags of a (sub)parser and its nested subcommands."""
    import argparse
    out = set()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out |= _numeric_flags(sub)
        elif a.type in (int, float):
            out.add(a.dest)
    return out


def test_every_numeric_flag_of_a_command_has_a_rule():
    """eval, generate and plan check their own numeric flags with config-style rules (the config's settings
    have theirs in config.rules.RULES); the other commands listed take no numbers. A new numeric flag needs a rule."""
    import argparse

    from gpt3d.config import field_index
    from gpt3d.commands.inference import EVAL_RULES, GENERATE_RULES
    from gpt3d.commands.plan import PLAN_RULES
    from gpt3d.commands.checkpoint import CHECKPOINT_RULES
    subs = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    expected = {"eval": EVAL_RULES, "generate": GENERATE_RULES, "plan": PLAN_RULES, "export-hf": {},
                "import-hf": {}, "plot": {}, "checkpoint-info": {}, "checkpoint": CHECKPOINT_RULES}
    config_flags = set(field_index())   # plan also takes every config flag (checked by RULES)
    for command, rules in expected.items():
        numeric = _numeric_flags(subs[command]) - (config_flags if command == "plan" else set())
        assert numeric == set(rules), command


# ----- every setting, YAML and flags, driven with wrong types, out-of-range values, NaN/inf (hypothesis) ---------
FIELDS = [(klass, f) for klass in SECTIONS.values() for f in dataclasses.fields(klass)]
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
_HUGE = st.sampled_from([2 ** 31, 2 ** 62, 2 ** 63, 2 ** 64, 10 ** 30, -2 ** 63 - 1])
_FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 5e-324, 0.5, -0.5])
_INTS = st.integers(min_value=-3, max_value=2) | _HUGE
_NESTED = st.lists(st.integers() | _TEXT, max_size=2) | st.dictionaries(_TEXT, st.integers(), min_size=1, max_size=1)


def _bad_values(klass, f) -> st.SearchStrategy:
    """Values of the wrong type for the field, and its type's edge values (0, negatives, 2^63, NaN, inf)."""
    t = field_types(klass)[f.name]
    choices = f.metadata.get("choices")
    edge = {int: _INTS, float: _FLOATS | _INTS, bool: _INTS | _FLOATS | _TEXT, str: _INTS | _FLOATS | _TEXT,
            list: _INTS | _FLOATS | st.lists(st.booleans() | st.none() | _NESTED, min_size=1, max_size=2)}[t]
    wrong = st.booleans() if t is not bool else st.sampled_from(["maybe", "2"])
    return st.one_of(edge, wrong, _NESTED, st.none(), _TEXT, st.sampled_from(choices or [None]))


def _as_flags(klass, f, value) -> list:
    t, flag = field_types(klass)[f.name], flag_name(f)
    if t is bool:   # switches take no value: a value is argparse's error, the switch alone is a valid run
        return [flag] if value is True else [f"{flag}={value}"]
    if value is None:
        return [flag]
    return [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A checkpoint directory and a metrics file from an earlier run: what a refused run must leave as it was."""
    root = tmp_path_factory.mktemp("existing")
    assert cli.main(["train", *BASE, "--train-iters", "1", "--save", str(root / "ck"),
                     "--log-file", str(root / "m.jsonl")]) == 0
    return root


@pytest.fixture
def accepted_runs_stop_before_the_first_step():
    """An accepted run (everything checked, model and data built) returns instead of training: these tests are
    about what a run refuses, so "success" costs a model build, not an optimisation; the watchdog stays off."""
    from gpt3d.train import loop, watchdog
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.Trainer, "_loop", lambda self, train_ds, valid_ds, stop: None)
        mp.setattr(watchdog.Watchdog, "__enter__", lambda self: self)
        mp.setattr(watchdog.Watchdog, "__exit__", lambda self, *exc: None)
        yield


def _number(text, integral: bool):
    """A flag's or YAML value's number as gpt3d reads it (an int setting's may be written 3e9), or None."""
    if integral:
        try:
            return int(text)
        except (TypeError, ValueError):
            pass
    try:
        x = float(text)
    except (TypeError, ValueError, OverflowError):
        return None
    if integral:
        return int(x) if math.isfinite(x) and x.is_integer() else None
    return x


def _must_be_refused(klass, f, value, via: str) -> bool:
    """What the type and range rules say of `value` alone: True where gpt3d must refuse it (a bool for a number,
    a number for a path or list, a list or mapping for a scalar, null for a setting that needs a value, a
    non-integral number for an int, NaN/inf, a value outside its RULES range or choices); False where it may be
    accepted (other settings' rules may still refuse the combination)."""
    from gpt3d.config.rules import RULES
    t, name, choices = field_types(klass)[f.name], f.name, f.metadata.get("choices")
    if via == "flags":
        if t is bool or value is None:
            return value is not True
        if t in (str, list):
            return (choices is not None and str(value) not in map(str, choices)) or None
        value = " ".join(map(str, value)) if isinstance(value, list) else str(value)   # as _as_flags passes it
    else:
        if value is None:
            return f.name not in optional_fields(klass)
        if t is bool:
            return not (isinstance(value, bool) or str(value).lower() in ("true", "false", "yes", "no", "1", "0"))
        if isinstance(value, bool) or isinstance(value, dict):
            return True
        if t is str:
            return not isinstance(value, str) or "\0" in value or (choices is not None and value not in choices)
        if t is list:
            return not isinstance(value, str) and not (isinstance(value, list) and all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value))
        if isinstance(value, list):
            return True
    num = _number(value, integral=t is int)
    if num is None or (isinstance(num, float) and not math.isfinite(num)):
        return True
    rule = RULES.get(name)
    return (rule is not None and not rule[0](num)) or (choices is not None and num not in choices) or \
        (isinstance(num, int) and not -2 ** 63 <= num < 2 ** 63)


def _base_without(name: str, existing) -> list:
    """BASE, one step, saving into `existing`, less the setting under test (a flag would override its YAML)."""
    flags, i, base = [], 0, [*BASE, "--train-iters", "1", "--save", str(existing / "ck")]
    while i < len(base):
        takes_value = i + 1 < len(base) and not base[i + 1].startswith("--")
        if base[i].lstrip("-").replace("-", "_") not in (name, "no_" + name):
            flags += base[i:i + 1 + takes_value]
        i += 1 + takes_value
    return flags


def _one_run(name: str, argv: list, existing, refuse: bool) -> None:
    """`gpt3d train` with `argv` for setting `name`, in this process: exit 0 (not where `refuse`), or exit 2 with
    one `gpt3d: error:` line (warnings may precede it), no traceback, and every file of `existing` as it was."""
    before = runs.snapshot(existing)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(["train", *_base_without(name, existing), *argv])
        except SystemExit as e:   # argparse's own errors
            rc = e.code
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    if rc == 0:
        assert not refuse, f"{argv} was accepted"
        assert not any(x.startswith("gpt3d: error") for x in lines), lines
        return
    assert rc == 2 and lines and lines[-1].startswith("gpt3d: error: "), (argv, rc, lines[-5:])
    assert all(x.startswith("gpt3d: warning: ") for x in lines[:-1]), (argv, lines)
    assert runs.snapshot(existing) == before, argv


@pytest.mark.parametrize("klass,f", FIELDS, ids=[f.name for _, f in FIELDS])
@fuzz(6, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_setting_in_yaml_and_flags_is_accepted_or_one_error_line(klass, f, data, existing, tmp_path,
                                                                       accepted_runs_stop_before_the_first_step):
    """Each config field (the dataclasses of gpt3d/config/schema.py enumerate them), set in a YAML file or by its flag
    to a value of the wrong type (a bool for an int, a number for a path or a list, a list or mapping for a scalar,
    null), an edge value (0, negatives, 2^63 and beyond, NaN, inf) or one of its choices: the run is accepted
    (up to its first step) or refused with one error line, exit 2, nothing existing changed."""
    value = data.draw(_bad_values(klass, f), label="value")
    via = data.draw(st.sampled_from(["yaml", "flags"]), label="via")
    if via == "yaml":
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({f.name: value}))
        argv = ["--config", str(path)]
    else:
        argv = _as_flags(klass, f, value)
    cwd = os.getcwd()
    os.chdir(tmp_path)   # relative paths a value names land here
    try:
        _one_run(f.name, argv, existing, refuse=_must_be_refused(klass, f, value, via) is True)
    finally:
        os.chdir(cwd)


# ----- the launcher's variables; what data a run trains on ----------------------------------------------------------
_ENV_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=4)


@fuzz(30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(world=st.integers(-2, 9).map(str) | _ENV_TEXT, rank=st.none() | st.integers(-2, 9).map(str) | _ENV_TEXT)
def test_a_launchers_variables_left_in_the_shell_are_one_line(tmp_path, monkeypatch, world, rank,
                                                              accepted_runs_stop_before_the_first_step):
    """WORLD_SIZE=2 left in the shell of a plain `gpt3d train` (no torchrun, so no MASTER_ADDR/MASTER_PORT) used to
    end in torch's ValueError traceback, WORLD_SIZE=two in int()'s: any WORLD_SIZE/RANK is a run or one line."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("WORLD_SIZE", world)
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["train", *BASE, "--train-iters", "1", "--save", str(tmp_path / "ck")])
    lines = err.getvalue().splitlines()
    if rc == 0:
        assert int(world) == 1 and int(rank or 0) == 0
        return
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("gpt3d: error: "), lines
    if _number(world, True) and int(world) > 1 and 0 <= int(_number(rank or "0", True) or -1) < int(world):
        assert f"WORLD_SIZE={int(world)} is set but MASTER_ADDR and MASTER_PORT are not: start the job with " \
               "torchrun" in lines[0], lines
    assert not (tmp_path / "ck").exists()


def test_an_explicit_data_path_means_real_data_and_the_start_up_line_names_it(tmp_path, capsys, bpe, text_prefix):
    """configs/tiny.yaml sets mock data; `--data-path` on top of it used to train on mock tokens, silently. A data
    path given at a later layer (flags over YAML) means real data; on the command line the later of --mock-data
    and --data-path wins (a launcher's extra flags override its own); both in one YAML file are refused; the
    start-up line says which data is used."""
    from gpt3d import checkpoint
    small = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--num-layers", "1", "--seq-length", "16",
             "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
             "--train-iters", "1", "--eval-iters", "1", "--device", "cpu", "--log-file", str(tmp_path / "m.jsonl")]
    real = ["--data-path", text_prefix, "--vocab-file", str(bpe.vocab), "--merge-file", str(bpe.merges)]
    capsys.readouterr()
    assert cli.main(["train", *small, *real, "--save", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("gpt3d: data: "))
    assert re.fullmatch(rf"gpt3d: data: {re.escape(text_prefix)} \([\d,]+ tokens in [\d,]+ documents of the train "
                        r"split\), --split 969,30,1 \| tokenizer GPT2BPETokenizer: vocab.json, merges.txt", line), line
    state = checkpoint.read_meta(checkpoint.resolve(str(tmp_path / "ck")))["data_state"]
    assert state["mock_data"] is False and state["data_path"] == [text_prefix]
    assert cli.main(["train", *small]) == 0
    assert "gpt3d: data: mock (synthetic tokens, --mock-data)" in capsys.readouterr().out.splitlines()
    assert cli.main(["train", *small, *real, "--mock-data"]) == 0   # e.g. examples/train_1gpu.sh ... --mock-data
    assert f"gpt3d: data: mock (synthetic tokens, --mock-data; --data-path {text_prefix} is not read)" in \
        capsys.readouterr().out.splitlines()
    assert cli.main(["train", *small, "--mock-data", *real]) == 0
    assert line in capsys.readouterr().out.splitlines()
    both = tmp_path / "both.yaml"
    both.write_text(f"mock_data: true\ndata_path: {text_prefix}\n")
    assert cli.main(["train", *small[2:], "--config", str(both)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"gpt3d: error: {both} asks for both mock data and --data-path {text_prefix} (mock data trains on synthetic "
        "tokens, a data path on your data): give one"]
