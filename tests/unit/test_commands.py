"""gpt3d/commands/: parsing a command imports only its own module (and train's), the library never imports the
CLI or commands/, and the shared table printer lays values out as an f-string with the same specs would."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d.cli import COMMANDS
from gpt3d.commands.output import Column, table_line

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "gpt3d"


SHARED_FLAGS = {"export-hf": {"gpt3d.commands.inference"}}   # it takes eval/generate's tokenizer flags


def test_parsing_a_command_imports_only_its_module():
    code = ("import sys; from gpt3d import cli; cli.build_parser(sys.argv[1]); "
            "print(' '.join(m for m in sys.modules if m.startswith('gpt3d.commands.')))")
    for command, module in COMMANDS.items():
        out = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, check=True)
        loaded = set(out.stdout.split()) - {"gpt3d.commands.train", "gpt3d.commands.output"}
        assert loaded == {f"gpt3d.{module}", *SHARED_FLAGS.get(command, ())}, (command, loaded)


def test_the_library_never_imports_the_cli_or_commands():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "commands" or rel.name in ("cli.py", "__main__.py"):
            continue
        package = ["gpt3d", *rel.parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                names = [".".join([*base, *(node.module or "").split(".")]).strip(".")]
                names += [f"{names[0]}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n in ("gpt3d.cli", "gpt3d.commands") or n.startswith("gpt3d.commands.") for n in names):
                bad.append(f"{rel}:{node.lineno}")
    assert not bad, bad


_CELL = st.one_of(st.text(max_size=12), st.floats(allow_nan=False, allow_infinity=False, width=32),
                  st.integers(-10 ** 9, 10 ** 9))


@fuzz(100)
@given(st.lists(st.tuples(_CELL, st.integers(0, 15), st.sampled_from("<>"), st.sampled_from(["  ", ""])),
                min_size=1, max_size=6))
def test_table_line_is_the_f_string_it_replaces(cells):
    """Each value formatted with its column's spec, padded to its width: what `f"{v:>11,.0f}"` gives."""
    columns, expected, header = [], "", ""
    for value, width, align, before in cells:
        spec = ",.1f" if isinstance(value, float) else ",d" if isinstance(value, int) else ""
        columns.append(Column(str(value), width, align, spec, before))
        expected += f"{before}{value:{align}{width or ''}{spec}}"
        header += f"{before}{value!s:{align}{width or ''}}"
    values = [c[0] for c in cells]
    assert table_line(columns, values) == expected
    assert table_line(columns) == header
    assert table_line(columns, values[:-1]) == expected[:len(table_line(columns[:-1], values[:-1]))]
