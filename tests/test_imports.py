"""The import graph of the project, read from the source with ``ast`` (every module of lightning_modules/,
datamodules/, callbacks/ and configs/ as ``ctrlgen.*``; relative imports and imports inside functions included):
no cycle, no shared module importing a method package or an application, no method package importing an
application or the entry point, no bare ``lightning_modules``/``datamodules``/``callbacks``/``configs`` import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("lightning_modules", "datamodules", "callbacks", "configs")
METHODS = ("ecm", "defocus", "agebooth", "shortcoti")
SHARED = ("ctrlgen.lightning_modules.common", "ctrlgen.lightning_modules.metrics", "ctrlgen.callbacks",
          *(f"ctrlgen.datamodules.{m}" for m in ("base", "shards", "multi", "prompts", "images", "synth")))
METHOD_PACKAGES = tuple(f"ctrlgen.{f}.{m}" for f in ("lightning_modules", "datamodules") for m in METHODS)
APPS = ("ctrlgen.lightning_modules.apps", "ctrlgen.lightning_modules.cli")


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """``ctrlgen.<folder>.<...>`` → file, for every .py file of the installed folders."""
    mods = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = ("ctrlgen", *path.relative_to(root).with_suffix("").parts)
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every module name an import statement anywhere in ``tree`` refers to (``from X import y`` gives ``X.y`` and
    ``X``; the caller keeps the ones that are modules), with its line."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out += [(f"{target}.{a.name}", node.lineno) for a in node.names] + [(target, node.lineno)]
    return out


def import_graph(root: Path = REPO) -> tuple[dict[str, set[str]], list[str]]:
    """(module → project modules it imports, bare-import findings "file:line: name")."""
    mods = project_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    bare = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        found: dict[int, list[str]] = {}
        for name, line in imported_names(tree, mod, path.name == "__init__.py"):
            if name.split(".")[0] in FOLDERS:
                bare.append(f"{path.relative_to(root)}:{line}: {name}")
            found.setdefault(line, []).append(name)
        for names in found.values():
            # `from X import y`: the submodule X.y if it is one, else the module X itself
            subs = [n for n in names if n in mods and n != mod]
            for n in subs:
                if not any(o != n and o.startswith(n + ".") and o in mods for o in subs):
                    graph[mod].add(n)
    return graph, sorted(set(bare))


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Shared modules importing a method package or an application; method packages importing an application."""
    bad = []
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if under(mod, SHARED) and under(dep, METHOD_PACKAGES + APPS):
                bad.append(f"shared {mod} imports {dep}")
            elif under(mod, METHOD_PACKAGES) and under(dep, APPS):
                bad.append(f"method {mod} imports {dep}")
    return bad


# ----------------------------------------------------------------------------- the checkers themselves
def test_cycle_finder_on_synthetic_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}, "b": set()}) == [["a"]]
    two = find_cycles({"x": {"y"}, "y": {"x", "p"}, "p": {"q"}, "q": {"p"}})
    assert two == [["p", "q"], ["x", "y"]]


def test_graph_reader_sees_relative_function_level_and_bare_imports(tmp_path):
    """A synthetic tree: a relative cycle split over a function-level import, an upward import from a shared
    module and a bare import are all reported."""
    ecm, common = tmp_path / "lightning_modules" / "ecm", tmp_path / "lightning_modules" / "common"
    for d in (ecm, common, tmp_path / "datamodules", tmp_path / "callbacks", tmp_path / "configs"):
        d.mkdir(parents=True, exist_ok=True)
        (d / "__init__.py").write_text("")
    (ecm / "var.py").write_text("from .layers import Block\n")
    (ecm / "layers.py").write_text("def f():\n    from . import var\n    return var\n")
    (common / "base.py").write_text("from ctrlgen.lightning_modules.ecm.var import VAR\nimport datamodules.base\n")
    graph, bare = import_graph(tmp_path)
    assert graph["ctrlgen.lightning_modules.ecm.var"] == {"ctrlgen.lightning_modules.ecm.layers"}
    assert graph["ctrlgen.lightning_modules.ecm.layers"] == {"ctrlgen.lightning_modules.ecm.var"}
    assert find_cycles(graph) == [["ctrlgen.lightning_modules.ecm.layers", "ctrlgen.lightning_modules.ecm.var"]]
    assert upward_imports(graph) == [
        "shared ctrlgen.lightning_modules.common.base imports ctrlgen.lightning_modules.ecm.var"]
    assert bare == ["lightning_modules/common/base.py:2: datamodules.base"]


# ----------------------------------------------------------------------------- the project
@pytest.fixture(scope="module")
def project():
    return import_graph()


def test_project_modules_are_found(project):
    graph, _ = project
    for m in ("ctrlgen.lightning_modules.cli", "ctrlgen.lightning_modules.common.slurm", "ctrlgen.configs",
              "ctrlgen.lightning_modules.ecm.samplers", "ctrlgen.datamodules.images", "ctrlgen.callbacks"):
        assert m in graph, m
    assert "ctrlgen.lightning_modules.ecm.samplers" in graph["ctrlgen.lightning_modules.ecm.var"]  # edges are read


def test_no_import_cycles(project):
    graph, _ = project
    assert find_cycles(graph) == []


def test_no_upward_imports(project):
    graph, _ = project
    assert upward_imports(graph) == []


def test_no_bare_top_level_imports(project):
    _, bare = project
    assert bare == [], "import these as ctrlgen.<folder>"


def test_tests_and_bench_import_the_namespace():
    """Tests and bench scripts import the project as ``ctrlgen.*`` too (relative imports there are their own)."""
    bare = []
    for path in sorted([*(REPO / "tests").rglob("*.py"), *(REPO / "bench").rglob("*.py")]):
        for name, line in imported_names(ast.parse(path.read_text(), str(path)), "tests.x", False):
            if name.split(".")[0] in FOLDERS:
                bare.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert bare == [], "import these as ctrlgen.<folder>"


def test_slurm_guard_is_a_leaf(project):
    graph, _ = project
    assert graph["ctrlgen.lightning_modules.common.slurm"] == set()
