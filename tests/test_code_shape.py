"""The package stays readable: no function or method in instruct/ is longer than 60 lines
(its docstring included), so each one can be read on one screen."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "instruct"
LIMIT = 60


def long_functions(source: str, name: str, limit: int = LIMIT) -> list[str]:
    """``file:line function (n lines)`` for every function in ``source`` over ``limit``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_package_is_over_60_lines():
    found = [
        entry
        for path in sorted(PACKAGE.rglob("*.py"))
        for entry in long_functions(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    ]
    assert not found, "split these: " + "; ".join(found)


def test_the_check_finds_a_long_function():
    body = "".join(f"        x{i} = {i}\n" for i in range(LIMIT))
    source = f"def short():\n    return 1\n\n\nclass A:\n    def long(self):\n{body}"
    assert long_functions(source, "m.py") == [f"m.py:6 long ({LIMIT + 1} lines)"]
