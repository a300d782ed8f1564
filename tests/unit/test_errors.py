"""One error type with an exit code, printed by the CLI alone."""
from __future__ import annotations

import re

import pytest

from gpt3d import errors
from gpt3d.cli import main as cli_main

from tests.support import ROOT

PACKAGE = ROOT / "gpt3d"


def test_only_the_cli_prints_errors():
    """The error line's form lives in errors.error_line; the CLI prints it, and so does the watchdog, whose main
    thread is stuck and can never reach the CLI (a hung rank ends itself)."""
    literal = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if re.search(r"(print|write)\(.*gpt3d: error", p.read_text())]
    printers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                      if re.search(r"(print|write)\(error_line\(", p.read_text()))
    assert literal == [] and printers == ["cli.py", "train/watchdog.py"]


@pytest.mark.parametrize("cls,code", [(errors.ConfigError, 2), (errors.DataError, 2), (errors.TokenizerError, 2),
                                      (errors.CheckpointError, 2), (errors.HFError, 2), (errors.PlotError, 2),
                                      (errors.TrainingError, 3), (errors.PreprocessError, 2),
                                      (errors.HangError, 4)])
def test_cli_prints_one_line_and_returns_the_exit_code(cls, code, monkeypatch, capsys):
    def fail(args):
        raise cls("something is off")
    import gpt3d.commands.checkpoint
    monkeypatch.setattr(gpt3d.commands.checkpoint, "_info", fail)
    assert cli_main(["checkpoint-info", "x"]) == code
    assert capsys.readouterr().err.splitlines() == ["gpt3d: error: something is off"]
    assert issubclass(cls, errors.Gpt3dError)


def test_error_types_are_importable_where_they_were():
    from gpt3d.errors import CheckpointError
    from gpt3d.errors import ConfigError
    from gpt3d.errors import DataError
    from gpt3d.errors import TokenizerError
    from gpt3d.errors import TrainingError
    for cls in (CheckpointError, ConfigError, DataError, TokenizerError, TrainingError):
        assert getattr(errors, cls.__name__) is cls


def test_flag_types_come_from_the_annotations():
    from gpt3d.cli import build_parser
    from gpt3d.config.load import load_config
    cfg = load_config(build_parser().parse_args(
        ["train", "--num-key-value-heads", "2", "--loss-scale", "8", "--no-mock-data", "--train-tokens", "3e3",
         "--data-path", "a", "b"]))
    assert cfg.model.num_key_value_heads == 2 and isinstance(cfg.model.num_key_value_heads, int)
    assert cfg.precision.loss_scale == 8.0 and isinstance(cfg.precision.loss_scale, float)
    assert cfg.data.mock_data is False and cfg.training.train_tokens == 3000 and cfg.data.data_path == ["a", "b"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--num-key-value-heads", "two"])
