"""The import rule of DESIGN.md (Layout), checked on the source: every module of coopseg/ and
coopseg_kernels/ is parsed (ast, nothing is imported) and its imports form a graph.

    coopseg_kernels  <-  models, losses, data  <-  train, infer, evaluation, toy, transforms  <-  cli

Fails on (a) an import of coopseg from coopseg_kernels, (b) an import that points upward in
LAYERS, (c) an import cycle, (d) an import inside a function of anything but an optional
heavy dependency (OPTIONAL). Modules are found by walking the folders, so a module split into
a package (similarity.py -> similarity/) needs no change here; a new coopseg module that
LAYERS does not place fails until it is given a layer.

COOPSEG_LAYERS_ROOT=/path/to/checkout checks another tree.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("COOPSEG_LAYERS_ROOT") or Path(__file__).resolve().parents[1])
PACKAGES = ("coopseg", "coopseg_kernels")
KERNELS = "coopseg_kernels"
EXTENSIONS = {"coopseg_kernels._C"}  # compiled by setup.py (there only once built): leaves of the graph

# coopseg's layers: a module may import from its own layer (without a cycle) or below. A module
# takes the layer of its longest dotted prefix here (coopseg.models.norm -> coopseg.models).
# The package root itself is the facade that may re-export the public API: nothing imports it.
LAYERS = {
    "coopseg.errors": 0,
    "coopseg.models": 1, "coopseg.losses": 1, "coopseg.data": 1, "coopseg.config": 1, "coopseg.checkpoint": 1,
    "coopseg.train": 2, "coopseg.infer": 2, "coopseg.evaluation": 2, "coopseg.toy": 2, "coopseg.transforms": 2,
    "coopseg.cli": 3, "coopseg.__main__": 3, "coopseg": 3,
}
# Optional heavy dependencies (setup.py extras, or slow to import): imported inside the functions
# that need them on purpose, so that `import coopseg` works without them.
OPTIONAL = {"nibabel", "pydicom", "PIL", "matplotlib", "yaml", "nilearn", "scipy", "triton", "torchio"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                mods[module_name(path)] = path
    return mods


MODULES = find_modules()


def _enclosing_functions(tree: ast.AST) -> dict[ast.AST, bool]:
    """import node -> True when it sits inside a function body (def, async def, lambda)."""
    inside = {}

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                inside[child] = in_function
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return inside


def _resolve(name: str) -> str | None:
    """The longest known module that `name` (a dotted name) is or lies in."""
    while name:
        if name in MODULES or name in EXTENSIONS:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(mod: str, source: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported name, line, inside a function) for every import of a module. Internal names are
    resolved to modules: `from pkg import name` is pkg.name when that is a module, else pkg;
    external ones stay as written (their top-level package decides whether they are OPTIONAL)."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node, in_function in _enclosing_functions(tree).items():
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            targets = []
            for a in node.names:
                sub = f"{origin}.{a.name}"
                targets.append(sub if sub in MODULES or sub in EXTENSIONS else origin)
        for t in dict.fromkeys(_resolve(t) or t for t in targets):
            out.append((t, node.lineno, in_function))
    return sorted(out, key=lambda i: i[1])


def graph() -> dict[str, set[str]]:
    """Internal import edges (module-level and function-local ones: a deferred import is still
    a dependency); a module importing its own package root (`from . import x`) is no edge."""
    return {m: {t for t, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}


def layer(mod: str) -> int | None:
    name = mod
    while name:
        if name in LAYERS and (name == mod or name.count(".")):  # the bare root places only itself
            return LAYERS[name]
        name = name.rpartition(".")[0]
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component (Tarjan)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_cycle_through(min(comp), edges, comp) for comp in comps]


def _cycle_through(start: str, edges: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside a strongly connected component (breadth first)."""
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & comp):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle of {sorted(comp)}")


def test_modules_found():
    assert "coopseg.cli" in MODULES and KERNELS in MODULES and len(MODULES) > 20, sorted(MODULES)


def test_every_coopseg_module_has_a_layer():
    missing = [m for m in MODULES if m.split(".")[0] == "coopseg" and layer(m) is None]
    assert not missing, f"give these modules a layer in tests/test_layers.py LAYERS: {missing}"


def test_kernels_do_not_import_coopseg():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
           for m in MODULES if m.split(".")[0] == KERNELS
           for t, line, _ in imports(m) if t.split(".")[0] == "coopseg"]
    assert not bad, "coopseg_kernels must not import coopseg:\n" + "\n".join(bad)


# what coopseg may use of the kernels: the package's public API and its public modules
KERNELS_PUBLIC = {KERNELS, f"{KERNELS}.nn", f"{KERNELS}.reference", f"{KERNELS}.convert"}


def test_coopseg_uses_only_the_public_kernel_api():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
           for m in MODULES if m.split(".")[0] == "coopseg"
           for t, line, _ in imports(m) if t.split(".")[0] == KERNELS and t not in KERNELS_PUBLIC]
    assert not bad, "coopseg imports only coopseg_kernels' public API:\n" + "\n".join(bad)


def upward(mod: str, found) -> list[tuple[str, int]]:
    """(target, line) of the imports of a coopseg module that point to a higher layer."""
    if mod.split(".")[0] != "coopseg" or layer(mod) is None:
        return []
    return [(t, line) for t, line, _ in found
            if t.split(".")[0] == "coopseg" and t != mod and layer(t) is not None and layer(t) > layer(mod)]


def local_imports(found) -> list[tuple[str, int]]:
    """(target, line) of the imports inside a function of anything but an OPTIONAL package."""
    return [(t, line) for t, line, inside in found if inside and t.split(".")[0] not in OPTIONAL]


def test_no_upward_import():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line}: {m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
           for m in MODULES for t, line in upward(m, imports(m))]
    assert not bad, "imports that point upward:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles (one per group of modules that import each other):\n" + "\n".join(
        " -> ".join(c) for c in found)


def test_function_local_imports_are_optional_dependencies():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t} inside a function"
           for m in MODULES for t, line in local_imports(imports(m))]
    assert not bad, ("import these at module top (only optional heavy dependencies are imported lazily: "
                     f"{sorted(OPTIONAL)}):\n" + "\n".join(bad))


@pytest.mark.parametrize("source, expect", [
    ("from coopseg.cli import main\n", "upward"),
    ("def f():\n    from coopseg_kernels import warp\n", "local"),
    ("def f():\n    import scipy.ndimage\n", None),
    ("from ..train import Config\n", "upward"),  # relative: coopseg.data._layers_probe -> coopseg.train
    ("from .volumes import load_pair\n", None),
    ("from .. import cli\n", "upward"),          # a submodule named in `from pkg import name`
])
def test_checks_catch_a_bad_module(source, expect, monkeypatch):
    """The checks themselves, on a probe module coopseg/data/_layers_probe.py (in memory)."""
    name = "coopseg.data._layers_probe"
    monkeypatch.setitem(MODULES, name, ROOT / "coopseg" / "data" / "_layers_probe.py")
    found = imports(name, source)
    local, up = local_imports(found), upward(name, found)
    assert bool(local) == (expect == "local") and bool(up) == (expect == "upward"), (local, up)


def test_cycle_finder():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(edges) == [["a", "b", "c", "a"]]
