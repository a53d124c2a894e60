"""Regression end to end on scikit-learn's diabetes data: horizontal and vertical FL reach
an r2 within 0.05 of a centralized Ridge fitted on the same training rows and scored on
the same evaluation rows; user models, loss, optimizer and metrics from Python."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from enclavefl.data.tabular import load_sklearn
from enclavefl.jobs.config import load_job
from enclavefl.jobs.datasets import load_party_data
from enclavefl.jobs.hfl_job import holdout
from enclavefl.jobs.launcher import run_job
from enclavefl.jobs.vfl_api import follow, lead

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TOLERANCE = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_copy(name: str, directory: Path, **changes: dict[str, Any]) -> Path:
    """The example job with a free port, its policy by absolute path and `changes` merged per section."""
    job = yaml.safe_load((EXAMPLES / name).read_text())
    job["policy"] = str(EXAMPLES / "policy-sim.json")
    job["output"] = {"dir": str(directory / "out")}
    coordinator = job["parties"][0]
    coordinator["address"] = f"127.0.0.1:{free_port()}"
    for section, values in changes.items():
        job[section].update(values)
    path = directory / name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def ridge_r2(validation_ids: Any) -> float:
    """Centralized Ridge on every feature: fitted on the other rows, scored on `validation_ids`."""
    from sklearn.linear_model import Ridge  # here, not at collection (~1 s)
    from sklearn.metrics import r2_score

    table = load_sklearn("diabetes")
    held = np.isin(table.ids, np.asarray(validation_ids, dtype=str))
    model = Ridge(alpha=1.0).fit(table.X[~held], table.y[~held])
    return float(r2_score(table.y[held], model.predict(table.X[held])))


@pytest.mark.slow
def test_vfl_job_regression_reaches_ridge(tmp_path: Path) -> None:
    job = job_copy("vfl_diabetes_regression.yaml", tmp_path)
    errors: list[BaseException] = []

    def lab() -> None:
        try:
            follow(job=job, party="lab")
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    thread = threading.Thread(target=lab, daemon=True)
    thread.start()
    result = lead(job=job)
    thread.join(timeout=60)
    assert not errors, errors
    metrics = result["metrics"]
    assert set(metrics) == {"r2", "rmse", "mae"}
    assert result["extra"]["task"] == "regression"
    assert (result["extra"]["split"]["n_valid"], result["extra"]["split"]["n_train"]) == (88, 354)
    assert len(result["validation_ids"]) == 88 and len(result["train_ids"]) == 354
    baseline = ridge_r2(result["validation_ids"])
    assert metrics["r2"] >= baseline - TOLERANCE, (metrics, baseline)
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written["metrics"] == metrics and "validation_ids" not in written


@pytest.mark.integration  # end to end (parties over gRPC, or subprocesses): `make test`, not `make test-unit`
def test_api_vfl_torch_example_with_own_models_reaches_ridge(tmp_path: Path) -> None:
    job = job_copy("vfl_diabetes_regression.yaml", tmp_path, training={"epochs": 12})
    out = tmp_path / "api"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "api_vfl_torch.py"), "--out", str(out), "--job", str(job)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert set(metrics) == {"r2", "rmse", "mae", "median_ae"}
    assert 0 < metrics["median_ae"] < metrics["rmse"]
    baseline = ridge_r2(summary["validation_ids"])
    assert metrics["r2"] >= baseline - TOLERANCE, (metrics, baseline)


@pytest.mark.slow
def test_hfl_job_regression_reaches_ridge(tmp_path: Path) -> None:
    path = job_copy("hfl_diabetes_regression.yaml", tmp_path)
    result = run_job(path, out_dir=tmp_path / "out")
    assert result.ok, result.failed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    metrics = summary["metrics"]
    # The same split as the workers: each worker's part of the rows, then its held-out 20%.
    job = load_job(path)
    parts = [holdout(load_party_data(w.data, seed=job.job.seed), 0.2, job.job.seed) for w in job.workers()]
    baseline = ridge_r2(np.concatenate([held.ids for _, held in parts]))
    assert metrics["r2"] >= baseline - TOLERANCE, (metrics, baseline)
    assert metrics["rmse"] > metrics["mae"] > 0
    assert summary["split"]["n_valid"] == 88 and summary["split"]["evaluation"] == "workers"
