"""Bad values fail before any work with one `gpt3d: error:` line and exit 2; every command's user errors exit 2.

Each row goes through `gpt3d train` in this process: the run would write a metrics file and a checkpoint
into tmp_path, so an untouched tmp_path shows nothing started.
"""
from __future__ import annotations

import json

import pytest

from gpt3d import cli

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
    (["--num-workers", "-2"], "--num-workers must be non-negative, got -2"),
    (["--seed", "-1"], "--seed must be in [0, 2^31), got -1"),
    (["--bucket-size-mb", "nan"], "--bucket-size-mb must be a finite number, got nan"),
    (["--bucket-size-mb", "0"], "--bucket-size-mb must be positive, got 0.0"),
    (["--peak-tflops", "0"], "--peak-tflops must be positive, got 0.0"),
    (["--distributed-timeout-minutes", "inf"], "--distributed-timeout-minutes must be a finite number, got inf"),
    (["--exit-duration-in-mins", "nan"], "--exit-duration-in-mins must be a finite number, got nan"),
    (["--save-interval", "0"], "--save-interval must be positive, got 0"),
    (["--keep-last", "0"], "--keep-last must be positive, got 0"),
    (["--no-mock-data", "--data-path", "d", "--vocab-file", "v", "--merge-file", "m", "--split", "nan,1,0"],
     "bad --split 'nan,1,0'"),
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
])
def test_bad_value_in_yaml(tmp_path, capsys, yaml_text, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    rc, err = _run_train(tmp_path / "out", ["--config", str(tmp_path / "c.yaml")], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("gpt3d: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_every_numeric_setting_has_a_rule():
    """A new int/float setting gets a range in config_check.RULES (or fixed choices); NaN/inf are refused for all."""
    import dataclasses

    from gpt3d.config import SECTIONS
    from gpt3d.config_check import RULES
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

    from gpt3d.config import ConfigError
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

    from gpt3d.inference import sample_next
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
    have theirs in config_check.RULES); the other commands listed take no numbers. A new numeric flag needs a rule."""
    import argparse

    from gpt3d.config import field_index
    from gpt3d.inference import EVAL_RULES, GENERATE_RULES
    from gpt3d.plan.cli import PLAN_RULES
    from gpt3d.tools import CHECKPOINT_RULES
    subs = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    expected = {"eval": EVAL_RULES, "generate": GENERATE_RULES, "plan": PLAN_RULES, "export-hf": {},
                "import-hf": {}, "plot": {}, "checkpoint-info": {}, "checkpoint": CHECKPOINT_RULES}
    config_flags = set(field_index())   # plan also takes every config flag (checked by RULES)
    for command, rules in expected.items():
        numeric = _numeric_flags(subs[command]) - (config_flags if command == "plan" else set())
        assert numeric == set(rules), command
