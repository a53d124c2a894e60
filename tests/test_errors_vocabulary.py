"""One vocabulary of refusals: every check the code names is a Check, and docs/errors.md explains each."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from enclavefl.errors import Check, PrivacyBudgetExceeded, Rejected
from enclavefl.tee.policy import SGX_FIELDS, TDX_FIELDS
from enclavefl.tee.quote import _FAILURES

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "enclavefl"


def _checks_named_in_source() -> dict[str, str]:
    """check value -> where: every `check="..."` / `Check.X` the package writes."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "check" and isinstance(node.value, ast.Constant):
                if isinstance(node.value.value, str):
                    found.setdefault(node.value.value, where)
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Check"
                  and node.attr.isupper()):
                found.setdefault(f"Check.{node.attr}", where)
    return found


def test_every_check_in_the_code_is_a_member() -> None:
    values = {c.value for c in Check}
    names = {f"Check.{c.name}" for c in Check}
    unknown = {k: w for k, w in _checks_named_in_source().items() if k not in values | names}
    assert not unknown, unknown


def test_computed_checks_are_members() -> None:
    # Policy field names and dcap-qvl failure classes become checks at run time.
    computed = {*SGX_FIELDS, *("rtmr" if f.startswith("rtmr") else f for f in TDX_FIELDS)}
    computed |= {check for _, check, _ in _FAILURES}
    assert computed - {c.value for c in Check} == set()


def test_every_check_is_documented_with_cause_and_fix() -> None:
    text = (REPO / "docs" / "errors.md").read_text(encoding="utf-8")
    rows = {m.group(1): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(r"^\| `([a-z_-]+)` \|([^|]+)\|([^|]+)\|$", text, re.M)}
    assert set(rows) == {c.value for c in Check}
    assert all(cause and fix for cause, fix in rows.values())


def test_the_vocabulary_is_closed_and_keeps_its_wire_values() -> None:
    error = Rejected("no", check="policy-hash")
    assert error.check is Check.POLICY_HASH and error.check == "policy-hash"
    assert PrivacyBudgetExceeded("over").check is Check.PRIVACY
    with pytest.raises(ValueError):
        Rejected("no", check="not-a-check")
    # A check from a newer peer is not an error of ours: it reads as unspecified.
    assert Check.from_wire("from-the-future") is Check.UNSPECIFIED
    assert Check.from_wire("nonce") is Check.NONCE
