"""The import graph of ``instruct``: no cycle, and nothing imports an entry point.

Every ``import`` and ``from ... import`` of an ``instruct`` module counts, at module level
and inside functions alike (a deferred import is still a dependency), relative ones
resolved against their package. ``from pkg import name`` points at the submodule
``pkg.name`` when there is one, else at ``pkg`` itself. The graph is one of modules:
importing ``a.b.c`` also runs ``a.b``'s ``__init__``, but that implicit edge is not drawn
(with it, every package whose ``__init__`` gathers its submodules would be a cycle). Read
with ``ast``: nothing is imported, so the test is fast and sees the code as written.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Set
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "instruct"

# What ``python -m`` runs: the CLI modules, which only library code may serve.
ENTRY_POINTS = frozenset(
    {
        "instruct.run",
        "instruct.generate",
        "instruct.chat",
        "instruct.evaluate",
        "instruct.export",
        "instruct.report",
        "instruct.inspect",
        "instruct.self_instruct.cli",
    }
)


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module under ``root`` by its dotted name (a package by its ``__init__``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: Set[str]) -> set[str]:
    """The modules of ``known`` that ``tree`` (the code of ``module``) imports.

    ``import a.b`` and ``from a.b import x`` point at ``a.b``; ``from a import b`` at ``a.b``
    when that is a module, else at ``a``. Relative imports are resolved against the package.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(sub if (sub := f"{base}.{alias.name}") in known else base)
    return (found & known) - {module}


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of the other modules of ``modules``."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = imported_modules(tree, name, path.name == "__init__.py", set(modules))
    return graph


def find_cycle(graph: Mapping[str, Set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def is_entry_point(module: str) -> bool:
    return module in ENTRY_POINTS or module.endswith(".__main__")


def entry_point_imports(graph: Mapping[str, Set[str]]) -> list[str]:
    """``importer -> entry point`` for every import of an entry point, but by the entry
    point's own ``__main__`` (``python -m pkg`` runs ``pkg.__main__``, which may call
    ``pkg.cli``)."""
    wrong = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(t for t in targets if is_entry_point(t)):
            own_main = importer == target.rpartition(".")[0] + ".__main__"
            if not own_main:
                wrong.append(f"{importer} -> {target}")
    return wrong


def test_the_instruct_modules_import_one_another_without_a_cycle():
    cycle = find_cycle(import_graph(module_files()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_an_entry_point():
    wrong = entry_point_imports(import_graph(module_files()))
    assert not wrong, "entry points are imported by: " + "; ".join(wrong)


def runs_as_command(tree: ast.Module) -> bool:
    """Whether a module is a command: it has an ``if __name__ == "__main__":`` block or
    decorates a function with ``hydra_main`` (:mod:`instruct.entry`)."""
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            return True
        decorators = getattr(node, "decorator_list", [])
        if any(ast.unparse(d).startswith("hydra_main(") for d in decorators):
            return True
    return False


def test_the_list_of_entry_points_is_complete():
    """A new command is added to ENTRY_POINTS, so nothing can import it unnoticed."""
    modules = module_files()
    assert ENTRY_POINTS <= set(modules)
    commands = {
        name
        for name, path in modules.items()
        if runs_as_command(ast.parse(path.read_text(encoding="utf-8")))
    }
    assert {c for c in commands if not is_entry_point(c)} == set()


def test_the_checker_finds_a_cycle_and_its_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_checker_reads_deferred_and_relative_imports(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("from pkg.sub import leaf\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "leaf.py").write_text("def f():\n    from .. import top\n")
    (root / "top.py").write_text("from . import sub, name\nimport pkg.sub.leaf\n")
    graph = import_graph(module_files(root))
    assert graph == {
        "pkg": {"pkg.sub.leaf"},
        "pkg.sub": set(),
        "pkg.sub.leaf": {"pkg.top"},
        "pkg.top": {"pkg", "pkg.sub", "pkg.sub.leaf"},
    }
    assert find_cycle(graph) == ["pkg", "pkg.sub.leaf", "pkg.top", "pkg"]


def test_the_checker_flags_an_import_of_an_entry_point():
    graph = {
        "instruct.train": {"instruct.generate"},
        "instruct.self_instruct.__main__": {"instruct.self_instruct.cli"},
        "instruct.chat": {"instruct.decoding"},
        "instruct.report": {"instruct.self_instruct.__main__"},
    }
    assert entry_point_imports(graph) == [
        "instruct.report -> instruct.self_instruct.__main__",
        "instruct.train -> instruct.generate",
    ]
