"""The seed's verification table: ZeRO-1 DP=2, + TP=2, + PP=2 (3D, 8 ranks) vs one process, and the docs' copy.

The runs are the ones test_layouts.py makes (cached in tests/support/verification.py); the
table in docs/verification.md must be what `python -m tests.support.verification --update-docs` writes
from such a run, so a stale or hand-typed table fails here.
"""
from __future__ import annotations

import pytest

from tests.support.verification import (COMMAND, SEED_ROWS, TABLE_DOC, TOL, parse, seed_table, table_block,
                                        world_curves)


@pytest.fixture(scope="module")
def rows():
    return seed_table({name: world_curves(world)[name] for _, world, name, *_ in SEED_ROWS})


@pytest.mark.slow
def test_seed_layouts_match_one_process(rows):
    single, *layouts = rows
    assert [r["layout"] for r in layouts] == [label for label, *_ in SEED_ROWS]
    for r in layouts:
        assert r["train_diff"] <= TOL and r["valid_diff"] <= TOL, r
        assert abs(r["train"] - single["train"]) <= TOL and abs(r["valid"] - single["valid"]) <= TOL, r


@pytest.mark.slow
def test_docs_table_is_the_run(rows):
    block = table_block(TABLE_DOC.read_text())
    assert f"`{COMMAND}`" in block, "the docs table must say which command produced it"
    table = parse(block)
    assert [(r["layout"], r["ranks"], r["shape"]) for r in table] == \
        [(r["layout"], r["ranks"], r["shape"]) for r in rows], \
        f"docs/verification.md table layouts are stale; run {COMMAND}"
    for got, fresh in zip(table, rows):
        for key in ("train", "valid", "train_diff", "valid_diff"):
            if fresh[key] is None:
                assert got[key] is None, (got["layout"], key)
            else:
                assert got[key] is not None and abs(got[key] - fresh[key]) <= 1e-3, \
                    (f"docs/verification.md {got['layout']} {key} = {got[key]} but the run gives "
                     f"{fresh[key]:.6f}; run {COMMAND}")
