"""Rules the test suite keeps about itself, checked on its own source (nothing is imported):

- every hypothesis property test (`@given`) runs under `@fuzz(n)` (tests/support/fuzz.py): the same examples on
  every run and no deadline, so CI never turns red by the draw of a coin (a bare `@settings` draws new examples
  each run).
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _name(node: ast.expr) -> str:
    f = node.func if isinstance(node, ast.Call) else node
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def unfuzzed(source: str) -> list[str]:
    """Names of the functions in `source` decorated with `given` but not with `fuzz`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = {_name(d) for d in node.decorator_list}
            if "given" in names and "fuzz" not in names:
                out.append(node.name)
    return out


def test_every_property_test_runs_under_fuzz():
    bad = {str(p.relative_to(TESTS)): unfuzzed(p.read_text()) for p in TESTS.rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_check_sees_a_bare_settings_and_a_missing_one():
    src = '''
from hypothesis import given, settings
from tests.support.fuzz import fuzz

@settings(max_examples=5, deadline=None)
@given(x=st.integers())
def test_bare(x): pass

@given(x=st.integers())
def test_none(x): pass

@fuzz(5)
@given(x=st.integers())
def test_ok(x): pass

class T:
    @hypothesis.given(x=st.integers())
    def test_method(self, x): pass
'''
    assert unfuzzed(src) == ["test_bare", "test_none", "test_method"]
