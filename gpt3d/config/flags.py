"""Command-line flags generated from the config dataclasses (their names and annotated types), so every setting
has exactly one name in YAML (`num_layers`) and on the command line (`--num-layers`); and gpt3d's parser
class (defaults shown in --help, argparse's errors as the one `gpt3d: error:` line), used by every command.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from ..errors import ConfigError, error_line
from .schema import SECTIONS, flag_name
from .values import field_types

# Token (and sample) counts are often written 300e9 or 3_000_000_000.
TOKEN_COUNT_FIELDS = ("train_tokens", "train_samples", "lr_warmup_tokens", "lr_decay_tokens")


def show_default(value) -> str:
    """A default as `--help` shows it: `on`/`off` for switches, lists space-separated, numbers as written."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e4:
        return f"{value:.0f}"
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default where it has one: not None, not a plain switch (store_true
    and the like, whose default is simply "not given"), not one the help text already names."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (d is None or d is argparse.SUPPRESS or (action.nargs == 0 and not action.option_strings[1:])
                or "%(default)" in text or "default" in text or not action.option_strings):
            return text
        return f"{text} (default: {show_default(d)})".replace("%", "%%").replace("%%(", "%(")


class Parser(argparse.ArgumentParser):
    """gpt3d's parsers (each command's, sub-commands' too): defaults shown in --help, and argparse's errors (a bad
    flag or flag value) as the one `gpt3d: error:` line, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, error_line(ConfigError(f"{message} (`{self.prog} --help` lists the flags)")) + "\n")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are suppressed so only given flags override YAML (their help shows
    the dataclass default)."""
    parser.add_argument("--config", help="YAML config file (flags override it)")
    for section, klass in SECTIONS.items():
        group = parser.add_argument_group(section)
        types = field_types(klass)
        for f in dataclasses.fields(klass):
            names = [flag_name(f), *f.metadata.get("aliases", ())]
            kw = dict(dest=f.name, default=argparse.SUPPRESS, help=_help_with_default(f))
            t, choices = types[f.name], f.metadata.get("choices")
            if f.name in ORDERED:   # which data source came last decides (config.apply_layer)
                kw["action"] = _recording(argparse.BooleanOptionalAction if t is bool else _Store)
            if t is bool and names[0].startswith("--no-"):   # Megatron's negative switches (--no-load-optim)
                group.add_argument(*names, action="store_true", **kw)
                group.add_argument("--" + names[0][len("--no-"):], dest=f.name, action="store_false",
                                   default=argparse.SUPPRESS,
                                   help=f"undo {names[0]} (default: {'off' if f.default else 'on'})")
            elif t is bool:   # --X and --no-X, so a flag can undo what a config turns on
                group.add_argument(*names, **{"action": argparse.BooleanOptionalAction, **kw})
            elif t is list:
                group.add_argument(*names, nargs="+", **kw)
            else:
                conv = _int_tokens if f.name in TOKEN_COUNT_FIELDS else t if t in (int, float) else str
                if choices and f.default is None:   # an optional choice: `none` unsets what a config set
                    conv, choices = _none_or(conv), [*choices, None]
                group.add_argument(*names, type=conv, choices=choices,
                                   metavar=f.name.upper() if not choices else _choices_metavar(choices), **kw)
            for switch, (value, text) in f.metadata.get("const_aliases", {}).items():
                group.add_argument(switch, dest=f.name, action="store_const", const=value,
                                   default=argparse.SUPPRESS, help=text)


def _help_with_default(f: dataclasses.Field) -> str:
    """A config field's help with its default (flags suppress argparse's own default, see add_config_flags)."""
    text = f.metadata.get("help") or ""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default is None or default == [] or "default" in text:
        return text
    return f"{text} (default: {show_default(default)})".replace("%", "%%")


# Flags whose order on the command line matters: the later of --mock-data and --data-path wins (a launcher's
# extra flags come last and override its own).
ORDERED = ("mock_data", "data_path")


class _Store(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def _recording(base: type) -> type:
    """`base` (an argparse action) that also notes the order in which the ORDERED flags were given."""
    class Recording(base):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            namespace._order = [*getattr(namespace, "_order", []), self.dest]
    return Recording


def _none_or(conv: Callable) -> Callable:
    return lambda text: None if text == "none" else conv(text)


def _choices_metavar(choices: list) -> str:
    return "{" + ",".join("none" if c is None else str(c) for c in choices) + "}"


def _int_tokens(text: str) -> int:
    """Token counts are often written 300e9 or 3_000_000_000."""
    try:
        return int(float(text.replace("_", "")))
    except (ValueError, OverflowError):   # words, nan, inf
        raise argparse.ArgumentTypeError(f"expected a token count like 300e9, got {text!r}") from None
