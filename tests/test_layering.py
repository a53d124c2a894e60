"""Dependencies point down: leaf packages import no network, TEE or FL code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "enclavefl"


def _enclavefl_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "enclavefl" or name.startswith("enclavefl.")}


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        # enclavefl.extras (which depends on errors only) names the pip install line of an optional extra.
        ("train", ("enclavefl.train", "enclavefl.errors", "enclavefl.extras")),
        ("vfl", ("enclavefl.vfl", "enclavefl.train", "enclavefl.errors", "enclavefl.extras", "enclavefl.net",
                 "enclavefl.seal", "enclavefl.fsutil", "enclavefl.models", "enclavefl.data", "enclavefl.privacy")),
        ("privacy", ("enclavefl.privacy", "enclavefl.errors")),
    ],
)
def test_package_imports_only_below_it(package: str, allowed: tuple[str, ...]) -> None:
    wrong = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for name in _enclavefl_imports(path)
        if not any(name == a or name.startswith(a + ".") for a in allowed)
    }
    assert not wrong, sorted(wrong)
