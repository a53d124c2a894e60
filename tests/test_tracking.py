"""Experiment tracking (issue 13, item 17): output.tensorboard writes TensorBoard event files,
output.mlflow logs params, metrics per round and the summary to an MLflow tracking URI
(tested with a file: store); both need the [tracking] extra, and neither ever receives a key,
a key path, a token or data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from enclavefl.cli import main
from enclavefl.jobs.config import load_job
from enclavefl.jobs.demo import SIMULATED_POLICY, write_vfl_demo
from enclavefl.jobs.tracking import job_params, write_tracking

# Checked without importing them (seconds at collection); the tests that use them import them.
if not all(importlib.util.find_spec(m) for m in ("tensorboard", "mlflow")):
    pytest.skip("the [tracking] extra is not installed", allow_module_level=True)


def _job(tmp_path: Path, **output: Any) -> Path:
    (tmp_path / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    job_file = write_vfl_demo(tmp_path)
    job = yaml.safe_load(job_file.read_text())
    job["storage"]["key"] = "file:secret-keys/vfl.key"
    job["output"].update(output)
    job_file.write_text(yaml.safe_dump(job))
    return job_file


RECORDS = [
    {"step": 1, "unit": "epoch", "auc": 0.80, "logloss": 0.50, "loss": 0.55, "accuracy": 0.7},
    {"event": "party", "party": "follower", "step": 1, "loss": 0.55, "examples": 455, "compute_s": 0.3,
     "bytes_sent": 1000, "bytes_received": 900},
    {"step": 2, "unit": "epoch", "auc": 0.90, "logloss": 0.40, "loss": 0.45, "accuracy": 0.8},
]
SUMMARY = {"job": "demo-vfl-breast", "metrics": {"auc": 0.9}, "model": "/secret/out/model/leader.sealed",
           "final": {"auc": {"value": 0.9, "step": 2}}, "best": {"auc": {"value": 0.9, "step": 2}},
           "health": {"warnings": []}}


def test_tensorboard_and_mlflow_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # set by write_tracking for file: URIs
    job = load_job(_job(tmp_path, tensorboard=True, mlflow=True))
    out = tmp_path / "out-vfl"
    out.mkdir(exist_ok=True)
    write_tracking(job, out, RECORDS, SUMMARY)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("validation/auc")] == [(1, 0.8), (2, 0.9)]
    assert [e.value for e in events.Scalars("party/follower/bytes_sent")] == [1000.0]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")
    experiment = client.get_experiment_by_name("demo-vfl-breast")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "validation.auc")] == [
        (1, 0.8),
        (2, 0.9),
    ]
    assert run.data.metrics["best.auc"] == 0.9
    assert run.data.params["training.lr"] == "0.01" and run.data.params["model.top.name"] == "top_mlp"
    summary = json.loads(Path(run.info.artifact_uri.removeprefix("file://"), "summary.json").read_text())
    assert summary["final"]["auc"]["step"] == 2 and "model" not in summary
    # Nothing sensitive: no key spec, key path, policy, storage or data path anywhere.
    logged = json.dumps(run.data.params) + json.dumps(summary)
    for secret in ("secret-keys", "vfl.key", "file:", "storage", "breast_leader.csv", "policy"):
        assert secret not in logged, secret


def test_job_params_hold_no_paths_or_keys(tmp_path: Path) -> None:
    params = job_params(load_job(_job(tmp_path)))
    assert params["training.epochs"] == 10 and params["job.mode"] == "vfl"
    assert not any("key" in k or "storage" in k or "policy" in k or "data" in k for k in params)
    assert not any(isinstance(v, str) and "/" in v for v in params.values())


def test_a_tracking_job_without_the_extra_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.partition(".")[0] == "mlflow" else real(name, *a)
    )
    result = CliRunner().invoke(main, ["run", str(_job(tmp_path, mlflow="file:/tmp/mlruns"))])
    assert result.exit_code == 2, result.output
    assert "pip install 'enclavefl[tracking]'" in result.output and "mlflow not importable" in result.output


def test_mlflow_needs_a_uri(tmp_path: Path) -> None:
    from enclavefl.errors import ConfigError

    with pytest.raises(ConfigError, match="output.mlflow: expected a tracking URI"):
        load_job(_job(tmp_path, mlflow="just-a-name"))
