"""`make test` runs the lint and type gates before pytest, and they fail on a violation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "pyproject.toml"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def test_make_test_runs_ruff_and_mypy_before_pytest() -> None:
    done = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "ruff check" in out and "mypy" in out and "pytest" in out, out
    assert out.index("ruff check") < out.index("mypy") < out.index("pytest"), out


def test_ruff_fails_on_an_unused_import_with_the_project_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('"""A module with an unused import."""\n\nimport os\n', encoding="utf-8")
    failed = _run("ruff", "check", "--config", str(CONFIG), str(bad), cwd=tmp_path)
    assert failed.returncode == 1 and "F401" in failed.stdout, failed.stdout + failed.stderr
    bad.write_text('"""A clean module."""\n\nimport os\n\nprint(os.sep)\n', encoding="utf-8")
    assert _run("ruff", "check", "--config", str(CONFIG), str(bad), cwd=tmp_path).returncode == 0


def test_mypy_fails_on_a_type_error_with_the_project_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('count: int = "three"\n', encoding="utf-8")
    failed = _run("mypy", "--config-file", str(CONFIG), "--no-incremental", str(bad), cwd=tmp_path)
    assert failed.returncode == 1 and "[assignment]" in failed.stdout, failed.stdout + failed.stderr


def test_ruff_fails_on_a_function_with_too_many_branches(tmp_path: Path) -> None:
    # The function-size gate (pyproject [tool.ruff.lint.pylint]): 13 branches where 12 are allowed.
    body = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(13))
    bad = tmp_path / "branchy.py"
    bad.write_text(f'"""Branches."""\n\n\ndef pick(x: int) -> int:\n{body}    return -1\n', encoding="utf-8")
    failed = _run("ruff", "check", "--config", str(CONFIG), str(bad), cwd=tmp_path)
    assert failed.returncode == 1 and "PLR0912" in failed.stdout, failed.stdout + failed.stderr
