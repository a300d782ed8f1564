"""The layering docs/architecture.md states, checked on the code's own import statements (nothing is imported).

- no import cycles between gpt3d's modules (imports inside functions count: a cycle hidden in a function is
  still two modules that need each other; `if TYPE_CHECKING:` imports count too);
- "Who may import whom": each layer imports only the layers above it or its own (LAYERS, which must be the
  block docs/architecture.md shows), and no library module imports `gpt3d.cli` or `gpt3d.commands`;
- errors come from `gpt3d.errors` only: a name of `gpt3d.errors`'s error classes is never imported from another
  module.

KNOWN_EXCEPTIONS lists the imports against the order that the code still has (each a TODO of architecture.md);
the test fails when one of them is gone, so the list only shrinks.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gpt3d"

# docs/architecture.md "Who may import whom", top to bottom: a module may import its own layer and those above.
LAYERS = [
    ["errors"],
    ["files", "console", "triton_kernels"],
    ["parallel.layout", "data.sizing"],
    ["config"],
    ["parallel"],
    ["model", "optim", "data", "tokenizers"],
    ["checkpoint"],
    ["perf.flops", "perf.throughput"],
    ["plan"],
    ["train"],
    ["perf.bench", "interop", "inference"],
    ["commands"],
    ["cli"],
]
TOP = {"__init__", "__main__"}   # gpt3d/__init__.py and python -m gpt3d: the package's entry, above the CLI

# Imports against the order that the code has today (importer -> imported), each named in architecture.md.
KNOWN_EXCEPTIONS = {
    ("gpt3d.commands.bench", "gpt3d.cli"),                        # `python -m gpt3d.commands.bench` runs the CLI
    ("gpt3d.commands.preprocess", "gpt3d.cli"),
    ("gpt3d.config.deepspeed", "gpt3d.parallel.state"),           # the launcher's world size (lazily)
    ("gpt3d.config.schema", "gpt3d.tokenizers.base"),             # the tokenizer type names
    ("gpt3d.config.load", "gpt3d.checkpoint.megatron_deepspeed"),  # settings from a Megatron-DeepSpeed run's args
    ("gpt3d.perf.flops", "gpt3d.plan.layout"),                    # type annotations only (TYPE_CHECKING)
    ("gpt3d.perf.flops", "gpt3d.plan.memory"),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of one file, relative ones
    resolved; a `from pkg import mod` that names a submodule counts as importing that submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            found += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{base}.{n}" not in known]
            if rest or not subs:
                found.append((base, rest, node.lineno))
    return found


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(package)
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for target, _, _ in imports_of(m, p, known):
            hit = _owner(target, known)
            if hit and hit != m:
                edges[m].add(hit)
    return edges


def _owner(target: str, known: set[str]):
    """The gpt3d module an import names (the longest known prefix), or None outside the package."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def layer_of(module: str) -> int:
    rel = module.removeprefix("gpt3d").lstrip(".")
    if rel in TOP or not rel:
        return len(LAYERS)
    best, where = "", None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (rel == entry or rel.startswith(entry + ".")) and len(entry) > len(best):
                best, where = entry, i
    if where is None:   # a package split over layers (gpt3d/perf/__init__.py): the layer of its lowest part
        where = min((i for i, layer in enumerate(LAYERS) for e in layer if e.startswith(rel + ".")), default=None)
    if where is None:
        raise AssertionError(f"{module} is in no layer of docs/architecture.md: add its package there and to LAYERS")
    return where


def against_the_order(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(m, t) for m, ts in edges.items() for t in ts if layer_of(t) > layer_of(m)}


# ----- the tests -------------------------------------------------------------------------------------------------
def test_no_import_cycles():
    assert cycles(graph()) == []


def test_layers_are_the_ones_architecture_md_shows():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Who may import whom", 1)[1]
    block = section.split("```", 2)[1]
    shown = [[e.strip() for e in re.split(r"\s{2,}", ln.strip())[0].split(",")] for ln in block.strip().splitlines()]
    assert shown == LAYERS


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_imports_follow_the_layers():
    found = against_the_order(graph())
    assert found - set(KNOWN_EXCEPTIONS) == set(), "imports against docs/architecture.md's order"
    assert set(KNOWN_EXCEPTIONS) - found == set(), "fixed: delete them from KNOWN_EXCEPTIONS and architecture.md"


def test_library_never_imports_the_cli_or_commands():
    edges = graph()
    for m, targets in edges.items():
        if layer_of(m) < layer_of("gpt3d.commands"):
            bad = sorted(t for t in targets if t == "gpt3d.cli" or t.startswith("gpt3d.commands"))
            assert bad == [], f"{m} imports {bad}"


def _error_names() -> set[str]:
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef)}


@pytest.mark.parametrize("where", ["gpt3d", "tests", "benchmarks"])
def test_errors_are_imported_from_gpt3d_errors_only(where):
    errors = _error_names()
    assert {"Gpt3dError", "ConfigError", "CheckpointError"} <= errors
    mods = modules(ROOT / where)
    known = set(modules())
    wrong = []
    for m, p in mods.items():
        for target, names, line in imports_of(m, p, known):
            if target.startswith("gpt3d") and target != "gpt3d.errors":
                wrong += [f"{p.relative_to(ROOT)}:{line}: {n} from {target}" for n in names if n in errors]
    assert wrong == []


# ----- the checker itself ------------------------------------------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return tmp_path


def test_the_checker_sees_a_cycle_hidden_in_a_function_and_an_import_against_the_order(tmp_path):
    _tree(tmp_path, {"gpt3d/__init__.py": "", "gpt3d/errors.py": "",
                     "gpt3d/model/__init__.py": "", "gpt3d/model/a.py": "from . import b\n",
                     "gpt3d/model/b.py": "def f():\n    from .a import x\n",
                     "gpt3d/optim/c.py": "from ..cli import main\nfrom gpt3d.errors import e\n",
                     "gpt3d/cli.py": ""})
    edges = graph(tmp_path / "gpt3d")
    assert cycles(edges) == [["gpt3d.model.a", "gpt3d.model.b"]]
    assert against_the_order(edges) == {("gpt3d.optim.c", "gpt3d.cli")}
