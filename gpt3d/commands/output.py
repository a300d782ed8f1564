"""How every `gpt3d` command prints its results: the one home of stdout for commands.

A command's result goes to stdout through `emit` (one JSON document where `--json` asks for it or the command's
result is data, else its text); hints for the next step go to stderr through `note`, so stdout stays the
result alone (a script can parse it); tables are laid out from `Column`s by `table_line`. Errors are not
printed here: gpt3d/cli.py prints the one `gpt3d: error: ...` line.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Optional
from collections.abc import Sequence


def emit(result: Any, as_json: bool = False, text: Optional[str] = None, indent: Optional[int] = None) -> None:
    """Print a command's result: as JSON when `as_json` or when it has no text form (a dict, a list), else
    `text` (a string result is its own text). Flushed, so lines reach a pipe as they are made."""
    if as_json or (text is None and not isinstance(result, str)):
        print(json.dumps(result, indent=indent), flush=True)
    else:
        print(result if text is None else text, flush=True)


def note(text: str) -> None:
    """A hint for the user (what to run next) on stderr, beside the result on stdout."""
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Column:
    """One column of a fixed-width table: its header, width, alignment ('<' or '>'), the format spec of its
    values (e.g. ',.0f', '.1%') and the text put before it ('  ' to set it apart)."""
    header: str
    width: int = 0
    align: str = ">"
    spec: str = ""
    before: str = ""


def table_line(columns: Sequence[Column], values: Optional[Sequence[Any]] = None) -> str:
    """The header line of `columns` (values None), or one row: each value formatted by its column's spec and
    padded to its width. Fewer values than columns: the row stops after the last value given."""
    if values is None:
        return "".join(f"{c.before}{c.header:{c.align}{c.width or ''}}" for c in columns)
    return "".join(f"{c.before}{format(v, c.spec):{c.align}{c.width or ''}}" for c, v in zip(columns, values))
