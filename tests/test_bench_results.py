"""bench/run_all.py: headlines are read from each bench's JSON and judged against their targets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", REPO / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module
    spec.loader.exec_module(module)
    return module


def test_headlines_pass_fail_and_missing_figures() -> None:
    run_all = _run_all()
    rows = run_all._headlines("bench_seal", {"seal_ratio": 0.9, "unseal_ratio": 0.5})
    assert [(r["value"], r["pass"]) for r in rows] == [(0.9, True), (0.5, False)]
    missing = run_all._headlines("bench_seal", {"seal_ratio": 0.9})
    assert missing[1]["pass"] is None and "unseal_ratio" in missing[1]["error"]


def test_a_bench_may_declare_its_own_headline() -> None:
    run_all = _run_all()
    rows = run_all._headlines("bench_new", {"headline": [{"name": "x", "value": 3.0, "op": "<=", "target": 2.5}]})
    assert rows == [{"name": "x", "value": 3.0, "op": "<=", "target": 2.5, "pass": False}]


def test_every_bench_names_a_headline() -> None:
    run_all = _run_all()
    for script in sorted((REPO / "bench").glob("bench_*.py")):
        declared = script.stem in run_all.HEADLINES or '"headline"' in script.read_text()
        assert declared, f"{script.name} names no headline: add it to HEADLINES in bench/run_all.py"
