"""The API examples run as documented, and a strategy defined outside the package works from
a job file (the example) and from Python (enclavefl.serve / enclavefl.run_worker)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import enclavefl
from enclavefl.errors import ConfigError
from enclavefl.train.torch import TensorBatches

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import api_custom_strategy  # noqa: E402
import api_hfl_torch  # noqa: E402


def run_example(script: str, out: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert all(p["attested"] and p["exit_code"] == 0 for p in summary["parties"].values()), summary["parties"]
    return summary


def test_api_hfl_torch_example_runs_a_three_worker_fedavg_job(tmp_path: Path) -> None:
    summary = run_example("api_hfl_torch.py", tmp_path, "--rounds", "2")
    assert summary["strategy"] == "fedavg" and summary["rounds"] == 2
    assert set(summary["parties"]) == {"server", "worker-0", "worker-1", "worker-2"}
    assert summary["metrics"]["auc"] > 0.9


def test_api_custom_strategy_example_runs_from_its_job_file(tmp_path: Path) -> None:
    summary = run_example("api_custom_strategy.py", tmp_path, "--rounds", "2", "--max-norm", "0.01")
    assert summary["strategy"] == "clipped-mean" and summary["rounds"] == 2
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    closed = [r for r in rounds if r.get("max_update_norm") is not None]
    assert len(closed) == 2 and all(r["max_update_norm"] > 0.01 for r in closed)  # so clipping acted
    assert closed[-1]["clipped_total"] >= 1


def test_custom_strategy_and_trainers_from_python(tmp_path: Path) -> None:
    spec = api_custom_strategy.job_file(tmp_path, rounds=2, port=api_custom_strategy.free_port(), max_norm=0.5)
    spec["parties"] = spec["parties"][:3]  # server and two workers
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec))
    strategy = api_custom_strategy.NormClippedMean(max_norm=1e-3)
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def party(name: str, call: Any) -> threading.Thread:
        def body() -> None:
            try:
                results[name] = call()
            except BaseException as exc:
                errors[name] = exc

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return thread

    def trainer(part: int) -> enclavefl.TorchTrainer:
        x, y = api_hfl_torch.load_part(part, parts=2)
        model = torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        return enclavefl.TorchTrainer(model, train_loader=TensorBatches((x, y), 32),
                                      eval_loader=TensorBatches((x, y), 256, shuffle=False))  # fmt: skip

    threads = [party("server", lambda: enclavefl.serve(strategy, job=job, out=tmp_path))]
    threads += [party(f"worker-{i}", lambda i=i: enclavefl.run_worker(trainer(i), job=job, party=f"worker-{i}",
                                                                    out=tmp_path)) for i in range(2)]  # fmt: skip
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert results["server"]["extra"]["strategy"] == "clipped-mean" and results["server"]["extra"]["rounds"] == 2
    assert strategy.clipped == 4  # both workers, both rounds
    assert all(results[f"worker-{i}"]["contributions"] == 2 for i in range(2))
    assert set(results["server"]["metrics"]) >= {"accuracy", "auc", "logloss"}


def test_user_strategy_parameters_are_checked_by_its_params_model(tmp_path: Path) -> None:
    from enclavefl.hfl.registry import build_strategy, entry_for_class

    entry = entry_for_class("api_custom_strategy:NormClippedMean", api_custom_strategy.NormClippedMean)
    with pytest.raises(ConfigError, match="max_norm: Input should be greater than 0"):
        build_strategy(entry, api_custom_strategy.NormClippedMean, None, {"max_norm": -1})
    built = build_strategy(entry, api_custom_strategy.NormClippedMean, None, {"max_norm": 2})
    assert built.max_norm == 2.0
    with pytest.raises(ConfigError, match="differs from this job's"):
        api_custom_strategy.NormClippedMean(3.0).load_state_dict(built.state_dict())
    assert np.isclose(api_custom_strategy.NormClippedMean().max_norm, 1.0)
