"""The package's import graph has no cycle, imports inside functions included.

A cycle hidden in a function-level import still ties two modules together: neither can be read,
tested or reused without the other, and the import only works because of the order modules happen
to load in. The graph is built from the source with `ast` (nothing is imported), so an import in
any function, method or `if` block counts."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "crosstrain"


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (absolute and relative imports, at any depth)."""
    root = package.name
    modules: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def known(name: str) -> str | None:
        """The longest prefix of a dotted name that is one of the package's modules."""
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = here[: len(here) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from pkg import name` may import the submodule pkg.name.
                names = [target] + [f"{target}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] != root:
                    continue
                found = known(name)
                if found is not None and found != module:
                    graph[module].add(found)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring the path)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_crosstrain_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and "crosstrain.runtime" in graph["crosstrain.train.loop"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layout", ["function-level", "relative", "from-package"])
def test_the_checker_finds_a_cycle(tmp_path, layout):
    """It must be able to fail: a synthetic package with a cycle written each way it can hide."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    if layout == "function-level":
        (pkg / "sub" / "b.py").write_text("def f():\n    if True:\n        from pkg.a import thing\n")
    elif layout == "relative":
        (pkg / "sub" / "b.py").write_text("from .. import a\n")
    else:  # `from pkg import a` names the module a
        (pkg / "sub" / "b.py").write_text("class C:\n    def m(self):\n        from pkg import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}  # the package and the module
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.a", "pkg.sub.b"}
    # Without the back edge the same package is acyclic.
    (pkg / "sub" / "b.py").write_text("import json\n")
    assert find_cycle(import_graph(pkg)) is None
