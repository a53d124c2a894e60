"""No function in src/enclavefl grows past one screen: split it into named helpers instead.

ruff's PLR0912/PLR0915 (pyproject.toml) cap branches and statements; this caps length, which
they miss (a long sequence of straight-line calls, a dict literal built in place). A body is
counted from its first statement after the docstring to its last line; generated protobuf
modules are not ours and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "enclavefl"
MAX_BODY_LINES = 60


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:]
    if not body:
        return 0
    return (node.end_lineno or node.lineno) - body[0].lineno + 1


def _too_long(source: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = _body_lines(node)
            if lines > MAX_BODY_LINES:
                found.append(f"{where}:{node.lineno} {node.name}: {lines} lines")
    return found


def _sources() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "_pb2" not in p.name]


def test_no_function_body_exceeds_the_limit() -> None:
    long = [
        found
        for path in _sources()
        for found in _too_long(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    ]
    assert not long, f"split these into helpers (limit {MAX_BODY_LINES} lines):\n" + "\n".join(long)


def test_the_walk_measures_bodies_without_their_docstring() -> None:
    def function(body_lines: int) -> str:
        return 'def f():\n    """Doc\n    string."""\n' + "    x = 1\n" * body_lines

    assert _too_long(function(MAX_BODY_LINES), "probe.py") == []
    assert _too_long(function(MAX_BODY_LINES + 1), "probe.py") == [f"probe.py:1 f: {MAX_BODY_LINES + 1} lines"]
    method = "class C:\n    async def g(self):\n" + "        await x\n" * (MAX_BODY_LINES + 1)
    assert _too_long(method, "probe.py") == [f"probe.py:2 g: {MAX_BODY_LINES + 1} lines"]
    assert _sources() and all("_pb2" not in p.name for p in _sources())
