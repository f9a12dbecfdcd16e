"""The import graph of flatmount/ and objects/: no cycle, and every edge goes down the layer table.

Every `import` statement counts, wherever it is (module level, inside functions, under
`if TYPE_CHECKING`): a function-level import is still a dependency, only a later one.  `from pkg import
mod` is an edge to `pkg.mod` when that is a module (not to `pkg/__init__`); `from pkg import name` is
an edge to `pkg`.  The tree is walked, so new modules and packages are checked without editing this.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flatmount", "objects")

# The layers, bottom first: a module may import its own layer and those below it.
BASE_HELPERS = ("errors", "log", "progress", "atomic", "safepath", "quoting", "reference", "record")
LAYERS = ("base", "image", "kernel", "store", "sources", "operations", "run", "api", "cli")
PACKAGE_LAYERS = {"image": "image", "kernel": "kernel", "store": "store", "sources": "sources",
                  "run": "run", "api": "api", "cli": "cli", "__main__": "cli"}


def layer_of(module: str) -> str:
    """The layer of a module: objects/ and the base helpers at the bottom; `flatmount` itself (the
    lazy facade of flatmount.api) with the api; any other top-level module or package of flatmount
    (pull, flatten, mount, diff, gc, fsck, usage, demo, ...) is an operation."""
    parts = module.split(".")
    if parts[0] == "objects":
        return "base"
    if len(parts) == 1:
        return "api"
    if parts[1] in BASE_HELPERS:
        return "base"
    return PACKAGE_LAYERS.get(parts[1], "operations")


@functools.cache
def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the packages (compiled extensions count as modules,
    known by their C source or their shared object)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*")):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            rel = path.relative_to(ROOT)
            stem = rel.name.split(".", 1)[0]
            if rel.suffix not in (".py", ".c", ".so"):
                continue
            parts = [*rel.parts[:-1], stem]
            if stem == "__init__":
                parts = parts[:-1]
            out.setdefault(".".join(parts), path)
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The module `name` is, or the innermost package/module of ours containing it."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def edges(mods: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """Module -> {(imported module, line)} for the packages' own modules (parsed once per run)."""
    return _edges(tuple(sorted(mods.items())))


@functools.cache
def _edges(items: tuple[tuple[str, Path], ...]) -> dict[str, set[tuple[str, int]]]:
    mods = dict(items)
    out: dict[str, set[tuple[str, int]]] = {}
    for mod, path in mods.items():
        deps: set[tuple[str, int]] = set()
        out[mod] = deps
        if path.suffix != ".py":
            continue
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    src = node.module or ""
                for a in node.names:   # `from pkg import mod` is an edge to pkg.mod, not pkg
                    sub = f"{src}.{a.name}"
                    targets.append(sub if sub in mods else src)
            for t in targets:
                r = _resolve(t, mods) if t.split(".")[0] in PACKAGES else None
                if r is not None and r != mod:
                    deps.add((r, node.lineno))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def _cycle_path(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete loop inside a strongly connected component, for the failure message."""
    members = set(comp)
    path = [comp[0]]
    seen = {comp[0]: 0}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)[0]
        if nxt in seen:
            return [*path[seen[nxt]:], nxt]
        seen[nxt] = len(path)
        path.append(nxt)


def test_walk_finds_the_tree() -> None:
    """The walk sees the modules this test is about (a broken walk would pass everything)."""
    mods = modules()
    for name in ("objects", "objects.store", "flatmount", "flatmount.api", "flatmount.store.core",
                 "flatmount.pull", "flatmount.cli", "flatmount.image.reader"):
        assert name in mods, name
    graph = edges(mods)
    assert "flatmount.errors" in {m for m, _ in graph["flatmount.pull"]}
    # `from flatmount.image import format as fmt` is an edge to the module, not the package
    reader = {m for m, _ in graph["flatmount.image.reader"]}
    assert "flatmount.image.format" in reader and "flatmount.image" not in reader


def test_no_import_cycle() -> None:
    mods = modules()
    graph = {m: {d for d, _ in deps} for m, deps in edges(mods).items()}
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(_cycle_path(c, graph)) + f"   ({len(c)} modules)"
                                                     for c in found)


def test_layers_import_only_downward() -> None:
    mods = modules()
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for mod, deps in sorted(edges(mods).items()):
        for dep, line in sorted(deps):
            if rank[layer_of(dep)] > rank[layer_of(mod)]:
                bad.append(f"{mods[mod].relative_to(ROOT)}:{line}: {mod} ({layer_of(mod)}) imports "
                           f"{dep} ({layer_of(dep)})")
    assert not bad, f"upward imports (layers, bottom first: {' < '.join(LAYERS)}):\n" + "\n".join(bad)


def test_objects_imports_nothing_of_flatmount() -> None:
    mods = modules()
    bad = [f"{mod} imports {dep}" for mod, deps in edges(mods).items() if mod.split(".")[0] == "objects"
           for dep, _ in deps if dep.split(".")[0] != "objects"]
    assert not bad, bad


def test_layer_table() -> None:
    """The table itself, so that a rename does not silently move a module to another layer."""
    assert layer_of("objects.bulk") == "base"
    assert layer_of("flatmount.safepath") == "base"
    assert layer_of("flatmount.image.writer") == "image"
    assert layer_of("flatmount.store.core") == "store"
    assert layer_of("flatmount.sources.oci") == "sources"
    assert layer_of("flatmount.pull") == layer_of("flatmount.diff.index") == "operations"
    assert layer_of("flatmount.run.bundle") == "run"
    assert layer_of("flatmount.api") == layer_of("flatmount") == "api"
    assert layer_of("flatmount.cli.store") == layer_of("flatmount.__main__") == "cli"
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert _cycle_path(["a", "b", "c"], graph) == ["a", "b", "c", "a"]
