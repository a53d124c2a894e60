"""Tasks: the job file refuses task/metric/loss combinations that cannot work, and a party
refuses labels its task cannot train on when it loads its data, before it attests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from enclavefl.errors import ConfigError, UsageError
from enclavefl.jobs import party as party_module
from enclavefl.jobs.config import load_job
from enclavefl.jobs.party import run_party
from enclavefl.train.tasks import check_labels


def write_job(directory: Path, data: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.json").write_text(json.dumps({"allow_simulated": True}))
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def hfl_job(data: dict[str, Any], model_args: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {
        "job": {"name": "t-task", "mode": "hfl"},
        "parties": [
            {"name": "ps", "role": "server", "address": "localhost:50071"},
            {"name": "w0", "role": "worker", "data": data},
        ],
        "tee": {"attester": "simulated", "allow_simulated_insecure": True},
        "policy": "policy.json",
        "model": {"name": "mlp", "args": {"hidden": [], **model_args}},
        "strategy": {"name": "fedavg", "rounds": 1, "batch_size": 8, "lr": 0.1},
        **sections,
    }


def vfl_job(
    leader_data: dict[str, Any], follower_data: dict[str, Any], top_out: int, **sections: Any
) -> dict[str, Any]:
    return {
        "job": {"name": "t-task-vfl", "mode": "vfl"},
        "parties": [
            {"name": "lead", "role": "leader", "address": "127.0.0.1:50072", "data": leader_data},
            {"name": "fol", "role": "follower", "data": follower_data},
        ],
        "tee": {"attester": "simulated", "allow_simulated_insecure": True},
        "policy": "policy.json",
        "model": {"bottom": {"name": "bottom_mlp", "args": {"out_features": 4}},
                  "top": {"name": "top_mlp", "args": {"out_features": top_out}}},
        "training": {"epochs": 1, "batch_size": 4, "lr": 0.1},
        **sections,
    }


def config_error(tmp_path: Path, data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_job(write_job(tmp_path, data))
    return str(caught.value)


DIABETES = {"kind": "sklearn", "name": "diabetes"}
DIGITS = {"kind": "sklearn", "name": "digits"}


# --------------------------------------------------------------------------- the job file


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"task": {"type": "regression"}, "evaluation": {"metrics": ["r2", "auc"]}},
         "evaluation.metrics[1]: auc is not defined for a regression task (it is for binary)"),
        ({"task": {"type": "multiclass", "loss": "mse"}},
         "task.loss: mse does not fit a multiclass task; use one of cross_entropy"),
        ({"task": {"type": "binary", "loss": "cross_entropy"}}, "task.loss: cross_entropy does not fit a binary task"),
        ({"evaluation": {"metrics": ["rmse"]}},
         "evaluation.metrics[0]: rmse is a regression metric: set task.type: regression"),
        ({"task": {"type": "multiclass"}, "evaluation": {"metrics": ["accuracy", "auc"]}},
         "evaluation.metrics[1]: auc is not defined for a multiclass task"),
        ({"task": {"type": "regression", "classes": 3}}, "task.classes: only used by type multiclass, not regression"),
        ({"task": {"type": "regression", "loss": "l2"}}, "task.loss: 'l2' is not a loss"),
        ({"task": {"type": "ordinal"}}, "task.type: got 'ordinal'"),
        ({"task": {"type": "regression"}, "evaluation": {"metrics": ["r2", "mine:r2"]}},
         "evaluation.metrics[1]: 'mine:r2' would be reported as 'r2', which another metric uses"),
    ],
)
def test_task_combinations_that_cannot_work_are_refused(
    tmp_path: Path, sections: dict[str, Any], expected: str
) -> None:
    assert expected in config_error(tmp_path, hfl_job(DIABETES, {"in_features": 10}, **sections))


def test_vfl_metrics_are_checked_against_the_task(tmp_path: Path) -> None:
    job = vfl_job(DIABETES, DIABETES, 1, task={"type": "regression"})
    job["training"]["metrics"] = ["accuracy"]
    assert "training.metrics[0]: accuracy is not defined for a regression task" in config_error(tmp_path, job)


def test_the_task_picks_its_default_loss_and_metrics(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, hfl_job(DIABETES, {"in_features": 10}, task={"type": "regression"})))
    assert job.task is not None and job.task.loss == "mse"
    assert job.metrics() == ("rmse", "mae", "r2")
    plain = load_job(write_job(tmp_path / "b", hfl_job(DIGITS, {"in_features": 64, "out_features": 10})))
    assert plain.task is None and plain.metrics() == ("accuracy", "logloss")


# --------------------------------------------------------------------------- labels, before attestation


@pytest.fixture
def never_attest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to attest fails the test: the label check must come first."""

    def attest(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the party attested before its labels were checked")

    monkeypatch.setattr(party_module.PartyRuntime, "create", attest)


def refusal(tmp_path: Path, job: dict[str, Any], party: str) -> str:
    path = write_job(tmp_path, job)
    with pytest.raises(UsageError) as caught:
        run_party(path, party, tmp_path / "out")
    return str(caught.value)


@pytest.mark.usefixtures("never_attest")
@pytest.mark.parametrize("task", [None, {"type": "binary"}])
def test_real_valued_labels_in_a_binary_task_are_refused(tmp_path: Path, task: dict[str, Any] | None) -> None:
    # Without a task section, one output column means binary, as before tasks were named.
    sections = {"task": task} if task else {}
    message = refusal(tmp_path, hfl_job(DIABETES, {"in_features": 10, "out_features": 1}, **sections), "w0")
    assert "sklearn diabetes, label column 'target': label 151 at id '0' in a binary task" in message
    assert "task.type: regression" in message


@pytest.mark.usefixtures("never_attest")
def test_labels_beyond_the_model_outputs_in_a_multiclass_task_are_refused(tmp_path: Path) -> None:
    job = hfl_job(DIGITS, {"in_features": 64, "out_features": 5}, task={"type": "multiclass"})
    message = refusal(tmp_path, job, "w0")
    assert "sklearn digits, label column 'target': label 5 at id '5' is not a class of this 5-class task" in message
    assert "labels must lie in 0..4" in message


@pytest.mark.usefixtures("never_attest")
def test_non_numeric_labels_are_refused_naming_file_column_and_value(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text("id,y,x0\n1,0,0.5\n2,yes,0.1\n")
    data = {"kind": "csv", "path": str(csv), "label": "y"}
    message = refusal(tmp_path, hfl_job(data, {"in_features": 1}), "w0")
    assert f"{csv} line 3, column 'y': 'yes' is not a number" in message


@pytest.mark.usefixtures("never_attest")
def test_the_hfl_server_checks_its_evaluation_labels(tmp_path: Path) -> None:
    job = hfl_job(DIGITS, {"in_features": 64, "out_features": 1},
                  evaluation={"where": "server", "data": DIGITS})
    assert "label 2 at id '2' in a binary task" in refusal(tmp_path, job, "ps")


@pytest.mark.usefixtures("never_attest")
def test_a_model_that_does_not_fit_the_task_is_refused(tmp_path: Path) -> None:
    job = hfl_job(DIABETES, {"in_features": 10, "out_features": 3}, task={"type": "regression"})
    assert "task.type: a regression model outputs one column per example, this model outputs 3" in refusal(
        tmp_path, job, "w0"
    )


@pytest.mark.usefixtures("never_attest")
def test_the_vfl_leader_checks_its_labels(tmp_path: Path) -> None:
    leader = {**DIABETES, "features": ["age", "sex", "bmi", "bp"]}
    follower = {**DIABETES, "features": ["s1", "s2"]}
    message = refusal(tmp_path, vfl_job(leader, follower, 1), "lead")
    assert "sklearn diabetes, label column 'target': label 151 at id '0' in a binary task" in message
    csv = tmp_path / "guest.csv"
    csv.write_text("id,y,x0\na,0,0.5\nb,2,0.1\nc,7,0.3\n")
    host = tmp_path / "host.csv"
    host.write_text("id,x0\na,1\nb,2\nc,3\n")
    job = vfl_job({"kind": "csv", "path": str(csv), "label": "y"}, {"kind": "csv", "path": str(host)}, 3,
                  task={"type": "multiclass"})
    message = refusal(tmp_path / "mc", job, "lead")
    assert f"{csv}, label column 'y': label 7 at id 'c' is not a class of this 3-class task" in message


@pytest.mark.integration  # end to end (parties over gRPC, or subprocesses): `make test`, not `make test-unit`
def test_a_bad_label_exits_2_from_the_command_line(tmp_path: Path) -> None:
    path = write_job(tmp_path, hfl_job(DIABETES, {"in_features": 10, "out_features": 1}))
    done = subprocess.run(
        [sys.executable, "-m", "enclavefl", "party", str(path), "--name", "w0", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "label 151 at id '0' in a binary task" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("labels", "task", "classes", "expected"),
    [
        (np.array([0.0, 1.0, np.nan]), "regression", None, "label nan at row 2 is not a finite number"),
        (np.array([0, 1, 2]), "binary", None, "label 2 at row 2 in a binary task"),
        (np.array([0.0, 1.5]), "multiclass", 3, "label 1.5 at row 1 in a multiclass task"),
        (np.array([0, -1]), "multiclass", 3, "label -1 at row 1 is not a class of this 3-class task"),
        (np.array(["a", "b"]), "regression", None, "labels must be numbers"),
    ],
)
def test_check_labels(labels: np.ndarray, task: Any, classes: int | None, expected: str) -> None:
    with pytest.raises(UsageError, match="f.csv, label column 'y': ") as caught:
        check_labels(labels, task, classes=classes, source="f.csv", column="y")
    assert expected in str(caught.value)
    check_labels(np.array([0.5, 2.0]), "regression", classes=None, source="f.csv", column="y")
