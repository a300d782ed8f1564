"""Every setting a config can turn on, the command line can turn off (gpt3d/cli.py's flag generator).

Walks every boolean field of every config section (not a list kept by hand, so a new switch is covered the
day it is added): a YAML file sets it true, the opposite flag on the command line wins, and `--help` lists both
forms. Activation recompute, an optional choice, is undone by `--recompute-granularity none` and
`--no-checkpoint-activations`.
"""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from gpt3d.cli import build_parser
from gpt3d.config.load import load_config
from gpt3d.config import SECTIONS, Config, field_types, flag_name

BOOL_FIELDS = [(section, f) for section, klass in SECTIONS.items() for f in dataclasses.fields(klass)
               if field_types(klass)[f.name] is bool]


def _undo_flag(f: dataclasses.Field) -> str:
    """`--no-X` for a switch `--X`; `--X` for Megatron's negative switches `--no-X` (e.g. --no-load-optim)."""
    flag = flag_name(f)
    return "--" + flag[len("--no-"):] if flag.startswith("--no-") else "--no-" + flag[2:]


def _config(tmp_path, yaml_settings: dict, flags: list):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(yaml_settings))
    return load_config(build_parser("train").parse_args(["train", "--config", str(path), *flags]))


def test_there_are_switches_to_walk():
    assert len(BOOL_FIELDS) > 20


@pytest.mark.parametrize("section,f", BOOL_FIELDS, ids=[f.name for _, f in BOOL_FIELDS])
def test_the_command_line_undoes_a_yaml_switch(tmp_path, section, f):
    assert getattr(getattr(Config.from_dict({f.name: True}), section), f.name) is True
    assert getattr(getattr(_config(tmp_path, {f.name: True}, [_undo_flag(f)]), section), f.name) is False
    assert getattr(build_parser("train").parse_args(["train", flag_name(f)]), f.name) is True


def test_help_lists_both_forms_of_every_switch():
    text = build_parser("train").format_help() + "".join(
        a.format_help() for a in build_parser("train")._subparsers._group_actions[0].choices.values())
    for _, f in BOOL_FIELDS:
        assert flag_name(f) in text and _undo_flag(f) in text, f.name


@pytest.mark.parametrize("undo", [["--recompute-granularity", "none"], ["--no-checkpoint-activations"]])
@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_the_command_line_undoes_recompute(tmp_path, undo, granularity):
    assert _config(tmp_path, {"recompute_granularity": granularity}, []).model.recompute_granularity == granularity
    assert _config(tmp_path, {"recompute_granularity": granularity}, undo).model.recompute_granularity is None
    assert _config(tmp_path, {}, ["--checkpoint-activations", *undo]).model.recompute_granularity is None
