"""`--help` of every command: each option has a help text and shows its default where it has one."""
from __future__ import annotations

import argparse
import dataclasses

from gpt3d.cli import build_parser
from gpt3d.config import SECTIONS


def _parsers(parser: argparse.ArgumentParser, path: tuple = ()):
    """(command path, parser) of every command and sub-command, nested ones (`checkpoint verify`) too."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def _config_defaults() -> dict:
    """dest -> dataclass default of the config flags (argparse's own default is suppressed for them)."""
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for klass in SECTIONS.values() for f in dataclasses.fields(klass)}


def _has_default(action: argparse.Action, config: dict):
    """The default --help must show, or None where there is none to show: no value, or a command's own plain
    switch (store_true/store_false: its default is "not given"); a --x/--no-x pair shows which one holds."""
    if action.default is argparse.SUPPRESS:        # a config flag: its dataclass default
        if type(action) is argparse._StoreConstAction:
            return None                            # a switch setting another flag (--checkpoint-activations)
        d = config.get(action.dest)
    elif action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
        return None
    else:
        d = action.default
    return None if d is None or d == [] else d


def test_every_option_of_every_command_has_help_and_shows_its_default():
    parsers = list(_parsers(build_parser(None)))
    names = {" ".join(path) for path, _ in parsers}
    assert {"train", "preprocess", "eval", "generate", "export-hf", "import-hf", "plan", "plot", "bench",
            "checkpoint-info", "checkpoint verify"} <= names
    config = _config_defaults()
    missing_help, missing_default = [], []
    for path, parser in parsers:
        formatter = parser._get_formatter()
        text = parser.format_help()          # renders every help string (a stray % would raise here)
        assert text
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"{' '.join(path) or 'gpt3d'} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                missing_help.append(where)
                continue
            if action.option_strings and _has_default(action, config) is not None:
                if "default" not in formatter._expand_help(action):
                    missing_default.append(where)
    assert not missing_help, f"options without help: {missing_help}"
    assert not missing_default, f"options whose help hides their default: {missing_default}"


def test_the_defaults_the_first_hour_looked_for_are_shown():
    parsers = dict((" ".join(p), x) for p, x in _parsers(build_parser(None)))
    train, generate = parsers["train"].format_help(), parsers["generate"].format_help()
    flat = " ".join(train.split())
    for flag, shown in (("--lr LR", "(default: 0.0003)"), ("--micro-batch-size MICRO_BATCH_SIZE", "(default: 4)"),
                        ("--eval-interval EVAL_INTERVAL", "(default: 1000)"),
                        ("--save-interval SAVE_INTERVAL", "default: with --save, one at the end")):
        after = flat[flat.rindex(flag):]   # the help entry, after the usage line
        assert shown in after[:300], (flag, after[:300])
    flat = " ".join(generate.split())
    for flag, shown in (("--max-new-tokens MAX_NEW_TOKENS", "(default: 64)"),
                        ("--temperature TEMPERATURE", "(default: 1.0)"), ("--seed SEED", "(default: 1234)")):
        after = flat[flat.rindex(flag):]   # the help entry, after the usage line
        assert shown in after[:300], (flag, after[:300])
