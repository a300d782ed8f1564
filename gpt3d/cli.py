"""`gpt3d <command>`: Megatron-style flags over YAML configs, and the one place errors are printed.

Flags are generated from the config dataclasses (their names and annotated types), so every setting has
exactly one name in YAML (`num_layers`) and on the command line (`--num-layers`).
Precedence: dataclass defaults < YAML file < flags. Every command raises `Gpt3dError` for what the user can
fix; `main` prints it as the one line `gpt3d: error: ...` and returns its exit code.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Callable, Optional

import yaml

from .config import SECTIONS, Config, apply_layer, field_types, flag_name, flatten, read_settings_file
from .errors import FileError, Gpt3dError, error_line

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
        self.exit(2, f"gpt3d: error: {message} (`{self.prog} --help` lists the flags)\n")


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


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config()
    yaml_keys: set = set()
    if getattr(args, "config", None):
        data = read_settings_file(args.config, lambda fh: yaml.safe_load(fh) or {}, yaml.YAMLError,
                                  lambda e: f"not valid YAML ({str(e).splitlines()[0]})",
                                  missing=f"config file not found: {args.config}",
                                  expected="expected a mapping of settings")
        flat = flatten(data, source=args.config)
        apply_layer(cfg, flat, source=args.config)
        yaml_keys = set(flat)
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func", "_order")}
    apply_layer(cfg, flatten(given, source="flags"), source="the command line", order=getattr(args, "_order", None))
    from .config.deepspeed import apply_deepspeed_config   # Megatron-DeepSpeed's --deepspeed_config
    decided = set(given) | yaml_keys | apply_deepspeed_config(cfg, set(given) | yaml_keys)
    if cfg.checkpoint.load:   # a Megatron-DeepSpeed checkpoint's args fill the settings left out
        from .checkpoint.megatron_deepspeed import apply_settings
        taken = apply_settings(cfg, decided)
        if taken and os.environ.get("RANK", "0") == "0":
            print("gpt3d: from the Megatron-DeepSpeed checkpoint's args: " +
                  " ".join(f"{k}={v}" for k, v in taken.items()), file=sys.stderr)
    return cfg


def _train(args: argparse.Namespace) -> int:
    from .train import main as train_main
    cfg = config_from_args(args)
    if cfg.training.run_name is None and getattr(args, "config", None):   # the run is named after its config
        cfg.training.run_name = os.path.splitext(os.path.basename(args.config))[0]
    return train_main(cfg)


# Every other command -> the module that registers its sub-parser (`register(sub)`) and runs it. Only the
# module of the command being run is imported, so a light command (preprocess) never pays for torch.
COMMANDS = {"preprocess": "data.preprocess", "bench": "perf.bench", "checkpoint-info": "commands.checkpoint",
            "checkpoint": "commands.checkpoint", "export-hf": "interop.hf", "import-hf": "interop.hf_import",
            "eval": "inference.generate", "generate": "inference.generate", "plot": "console.plot",
            "plan": "commands.plan"}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of `command` (and train's), or of every command when it is not one of them (e.g. --help)."""
    parser = Parser(prog="gpt3d", description="GPT pretraining with 3D parallelism")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    tp = sub.add_parser("train", help="pretrain a GPT model", allow_abbrev=False)
    add_config_flags(tp)
    tp.set_defaults(func=_train)
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in modules:
        importlib.import_module(f".{name}", __package__).register(sub)
    return parser


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)   # a bad flag exits 2 (argparse's own status), as every user error does
    func: Callable = args.func
    try:
        return int(func(args) or 0)
    except (Gpt3dError, OSError) as e:   # an OSError: a file the user named cannot be read or written
        err = e if isinstance(e, Gpt3dError) else FileError(str(e))
        print(error_line(err), file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
