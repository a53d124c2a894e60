"""The two privacy examples at full size reach the AUC the issue asks for within their budgets
(minutes each: `make test-slow`). The quick-run versions are in test_examples."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, example: str) -> dict:
    if not (SHARED_DATA / "tabular").is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    repo = tmp_path / "enclavefl"
    shutil.copytree(REPO / "examples", repo / "examples")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVEFL_")}
    done = subprocess.run([sys.executable, "-m", "enclavefl", "run", f"examples/{example}"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = list((repo / "runs").glob("*/summary.json"))
    assert len(summaries) == 1, summaries
    return json.loads(summaries[0].read_text())


def test_hfl_record_dp_at_epsilon_3_reaches_auc_074(tmp_path: Path) -> None:
    summary = _run(tmp_path, "hfl_default_credit_dp.yaml")
    assert summary["metrics"]["auc"] >= 0.74, summary["metrics"]
    workers = summary["privacy"]
    assert set(workers) == {"guest", "host-1", "host-2"}
    for spent in workers.values():
        assert spent["dp_accountant"] == "rdp" and spent["dp_delta"] == 1e-5
        assert 2.9 <= spent["dp_epsilon"] <= 3.0


def test_vfl_label_dp_at_epsilon_2_reaches_auc_074(tmp_path: Path) -> None:
    summary = _run(tmp_path, "vfl_default_credit_label_dp.yaml")
    assert summary["metrics"]["auc"] >= 0.74, summary["metrics"]
    assert summary["privacy"]["guest"]["label_epsilon"] == 2.0
    assert summary["privacy"]["guest"]["label_mechanism"] == "randomized-response"
