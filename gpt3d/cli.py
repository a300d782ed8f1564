"""`gpt3d <command>`: the dispatcher, and the one place errors are printed.

Parses the command line, hands it to the command's module (gpt3d/commands/, one per subcommand; flags of the
config come from gpt3d/config/flags.py), and prints a `Gpt3dError` as the one line `gpt3d: error: ...`,
returning its exit code. Precedence of settings: dataclass defaults < YAML file < flags (config/load.py).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional
from collections.abc import Callable

from .config.flags import Parser
from .errors import FileError, Gpt3dError, error_line


# Every other command -> the module that registers its sub-parser (`register(sub)`) and runs it. Only the
# module of the command being run is imported, so a light command (preprocess) never pays for torch.
COMMANDS = {"preprocess": "commands.preprocess", "bench": "commands.bench", "checkpoint-info": "commands.checkpoint",
            "checkpoint": "commands.checkpoint", "export-hf": "commands.export_hf", "import-hf": "commands.import_hf",
            "eval": "commands.inference", "generate": "commands.inference", "plot": "commands.plot",
            "plan": "commands.plan"}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of `command` (and train's), or of every command when it is not one of them (e.g. --help)."""
    parser = Parser(prog="gpt3d", description="GPT pretraining with 3D parallelism")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    importlib.import_module(".commands.train", __package__).register(sub)
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
        sys.stderr.write(error_line(err) + "\n")   # one write: ranks sharing a stderr never split the line
        sys.stderr.flush()
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
