"""Damaging files as a hostile or careless user would, for the tests of what gpt3d reads (issue 24).

Hypothesis strategies for the damage (a JSON value replaced at any path or removed, the text cut short, a
bit flipped), `reseal` for a meta.json edited by someone who also recomputes its checksums (they are no
signature), `one_error_line` for the outcome every bad input must have, and a small token corpus written
with gpt3d's own builder.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from gpt3d.checkpoint.integrity import file_checksum, with_meta_checksum
from gpt3d.cli import main as cli_main
from gpt3d.data.indexed import MMapIndexedDatasetBuilder

# Any JSON value, small: the wrong types a hand-edited or generated file holds (and plausible other sizes).
scalars = (st.none() | st.booleans() | st.integers(-2, 2 ** 70) | st.sampled_from([0, 1, -1, 3, 64, 2 ** 31, 2 ** 63])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)

# What to do to a file: ("set", path index, value), ("drop", path index), ("cut", fraction), ("flip", fraction,
# bit). A path index picks one of the document's paths (modulo their number, shallow ones first).
damage = st.one_of(st.tuples(st.just("set"), st.integers(0, 10 ** 6), json_values),
                   st.tuples(st.just("drop"), st.integers(0, 10 ** 6)),
                   st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
                   st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)))


def edits(where: list, sizes: list = ()) -> st.SearchStrategy:
    """("at", path, value): a value of any type at one of the paths `where` names (the entries a reader
    uses), or another plausible size at one of the paths `sizes` names, next to `damage` anywhere."""
    options = [st.tuples(st.just("at"), st.sampled_from(where), json_values), damage]
    if sizes:
        options.append(st.tuples(st.just("at"), st.sampled_from(sizes), st.integers(0, 130)))
    return st.one_of(*options)


def paths(doc) -> list:
    """Every path (tuple of keys / indices) into a JSON document, the document itself excluded, shallow ones
    first (a small path index, which hypothesis favours, edits a top-level entry)."""
    out, level = [], [((), doc)]
    while level:
        deeper = []
        for prefix, node in level:
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for k, v in items:
                out.append((*prefix, k))
                deeper.append(((*prefix, k), v))
        level = deeper
    return out


def damage_json(text: str, how: tuple) -> tuple[str, bool]:
    """(damaged text, whether it is still JSON whose structure was edited: worth re-sealing). "at" paths must
    lead through existing objects."""
    kind = how[0]
    if kind in ("cut", "flip"):
        raw = bytearray(text.encode())
        at = int(how[1] * len(raw))
        if kind == "cut":
            raw = raw[:at]
        else:
            raw[at] ^= 1 << how[2]
        return raw.decode("utf-8", "surrogateescape"), False
    doc = json.loads(text)
    where = paths(doc)
    if kind == "at":
        path = how[1]
    elif not where:
        return json.dumps(how[2] if kind == "set" else None), True
    else:
        path = where[how[1] % len(where)]
    node = doc
    for k in path[:-1]:
        node = node[k]
    if kind == "drop":
        del node[path[-1]]
    else:
        node[path[-1]] = how[2]
    return json.dumps(doc), True


def write_damaged(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


def reseal(path: Path, add: dict = (), drop: tuple = ()) -> None:
    """Rewrite the checkpoint's meta.json as an attacker who can edit it would: files `add`ed ({name: path})
    or `drop`ped, their sizes and checksums recorded, its own checksum recomputed."""
    meta = json.loads((path / "meta.json").read_text())
    for name in drop:
        del meta["files"][name], meta["checksums"][name]
    for name, f in dict(add).items():
        meta["files"][name], meta["checksums"][name] = os.path.getsize(f), file_checksum(str(f))
    (path / "meta.json").write_text(json.dumps(with_meta_checksum(meta), indent=1))


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`gpt3d ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def one_error_line(rc: int, err: str) -> bool:
    """The outcome of a refused input: exit 2 and, besides warnings, exactly one `gpt3d: error:` line."""
    lines = [x for x in err.strip().splitlines() if not x.startswith("gpt3d: warning: ")]
    return rc == 2 and len(lines) == 1 and lines[0].startswith("gpt3d: error: ")


def write_corpus(prefix: str, docs: list, dtype=np.uint16) -> None:
    """`docs` (token arrays; an empty one is an empty document) as Megatron's .bin/.idx at `prefix`."""
    b = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        if len(d):
            b.add_item(d)
        b.end_document()
    b.finalize(prefix + ".idx")


def docs_of(n: int, vocab: int, seed: int = 0) -> list:
    """n documents of 20-60 ids below vocab - 1 (NullTokenizer's eod is vocab - 1); 3 of them empty (so
    37 of the first 40 are not: a count no one-bit flip of a size reaches, see test_data_trust.py)."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab - 1, size=int(rng.integers(20, 60))) for _ in range(n)]
    for i in (3, 17, 30):
        docs[i] = docs[i][:0]
    return docs
