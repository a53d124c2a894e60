"""Issue 13: honest results and clear failures of `enclavefl run` / `predict`: final and best
metrics, never-learns warnings, the validation split, progress phases, the first failure
first, predictions in the leader's order with dropped rows counted, wide&deep prediction."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import hfl_demo_job
import yaml

from enclavefl.jobs.demo import SIMULATED_POLICY, write_vfl_demo
from enclavefl.jobs.launcher import PartyProcess, failure_report, run_job
from enclavefl.jobs.report import exported_note, result_notes
from enclavefl.jobs.results import final_and_best, health_warnings


def enclavefl(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enclavefl", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, check=False)


# --------------------------------------------------------------------------- units


def _evals(values: list[dict[str, float]]) -> list[dict[str, Any]]:
    return [{"event": "eval", "step": i + 1, "unit": "epoch", **v} for i, v in enumerate(values)]


def test_final_and_best_after_a_collapse() -> None:
    records = _evals([{"auc": 0.70, "logloss": 0.60}, {"auc": 0.846, "logloss": 0.45}, {"auc": 0.538, "logloss": 0.9}])
    records.insert(1, {"event": "round", "step": 1, "examples": 10})  # not an evaluation
    summary = final_and_best(records, ["auc", "logloss", "accuracy"])
    assert summary["final"] == {"auc": {"value": 0.538, "step": 3}, "logloss": {"value": 0.9, "step": 3}}
    assert summary["best"] == {"auc": {"value": 0.846, "step": 2}, "logloss": {"value": 0.45, "step": 2}}


def test_best_is_direction_aware_for_regression_and_f1() -> None:
    records = _evals([{"r2": 0.2, "rmse": 60.0, "macro_f1": 0.5}, {"r2": 0.4, "rmse": 55.0, "macro_f1": 0.7},
                      {"r2": 0.3, "rmse": 58.0, "macro_f1": 0.6}])  # fmt: skip
    summary = final_and_best(records, ["r2", "rmse", "macro_f1"])
    assert summary["best"] == {"r2": {"value": 0.4, "step": 2}, "rmse": {"value": 55.0, "step": 2},
                               "macro_f1": {"value": 0.7, "step": 2}}  # fmt: skip
    assert summary["final"]["r2"] == {"value": 0.3, "step": 3}


def test_exported_note_says_which_epoch_keep_best_exported() -> None:
    best = {"job": "j", "epochs": 9, "exported": {"keep": "best", "epoch": 4, "by": "auc", "value": 0.8123}}
    assert exported_note(best) == "j: exported epoch 4 (best auc 0.8123), not the last"
    assert exported_note({**best, "epochs": 4}) == "j: exported epoch 4 (best auc 0.8123)"
    assert exported_note({"job": "j", "exported": {"keep": "last", "epoch": 9}}) is None


def test_health_flags_a_run_that_never_learns() -> None:
    stuck = _evals([{"auc": 0.5, "logloss": math.log(2)}] * 30)
    warnings = health_warnings(stuck)
    assert any("AUC stayed within" in w for w in warnings)
    assert any("constant predictions" in w for w in warnings)
    assert any("flat over the first 3 evaluations" in w for w in warnings)
    assert all("standardize" in w for w in warnings)
    learning = _evals([{"auc": 0.6, "logloss": 0.68}, {"auc": 0.7, "logloss": 0.6}, {"auc": 0.75, "logloss": 0.55}])
    assert health_warnings(learning) == []


class _Proc:
    def __init__(self, returncode: int) -> None:
        self.returncode = returncode
        self.pid = 0

    def poll(self) -> int:
        return self.returncode


def _party(
    tmp_path: Path, name: str, code: int, exited_at: float, lines: list[str], stopped: bool = False
) -> PartyProcess:
    log = tmp_path / f"{name}.log"
    log.write_text("\n".join(lines) + "\n")
    proc = PartyProcess(name, "x", _Proc(code), log, None, exit_code=code)  # type: ignore[arg-type]
    proc.exited_at, proc.stopped = exited_at, stopped
    return proc


def test_the_first_failure_is_reported_first_with_its_own_error(tmp_path: Path) -> None:
    retries = [
        f"2026-01-01 INFO enclavefl.net: connecting to localhost:50192 failed (attempt {i} of 5)" for i in range(5)
    ]
    guest = _party(tmp_path, "guest", 2, 20.0, [*retries, "enclavefl: error: follower host left the federation"])
    host = _party(tmp_path, "host", 2, 10.0, ["enclavefl: error: cannot read data.csv: No such file or directory"])
    failures = failure_report([guest, host])
    assert [f["party"] for f in failures] == ["host", "guest"]
    assert failures[0]["first"] and "data.csv" in failures[0]["error"]
    summary = {
        "job": "j",
        "failures": failures,
        "parties": {"guest": {"attested": True}, "host": {"attested": False, "exit_code": 2}},
    }
    notes = result_notes(summary)
    assert notes[0] == "j: host failed first (exit 2): cannot read data.csv: No such file or directory"
    assert "j: host not attested: exited 2 before attestation completed" in notes


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def vfl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The breast-cancer vertical demo, 3 epochs, standardized, run once in-process with --write-split."""
    work = tmp_path_factory.mktemp("vfl")
    (work / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    job_file = write_vfl_demo(work)
    job = yaml.safe_load(job_file.read_text())
    job["training"]["epochs"] = 3
    job["storage"]["key"] = "file:keys/demo.key"  # created in simulation mode
    job["preprocess"] = {"standardize": True}
    job_file.write_text(yaml.safe_dump(job))
    phases: list[str] = []
    result = run_job(job_file, on_phase=phases.append, write_split=True, timeout_s=300)
    assert result.ok, result.summary
    return {"work": work, "job": job_file, "out": result.out_dir, "summary": result.summary, "phases": phases}


def test_summary_has_final_best_split_and_health(vfl: dict[str, Any]) -> None:
    summary = vfl["summary"]
    assert summary["final"]["auc"]["step"] == 3 and summary["final"]["auc"]["value"] == summary["metrics"]["auc"]
    assert summary["best"]["auc"]["value"] >= summary["final"]["auc"]["value"]
    assert summary["health"] == {"warnings": []}
    split = summary["split"]
    assert (split["n_train"], split["n_valid"], split["seed"]) == (455, 114, 0)
    written = (vfl["out"] / "validation_ids.csv").read_text().splitlines()
    assert written[0] == "id" and len(written) == 1 + 114
    with open(vfl["work"] / "breast_leader.csv", newline="") as handle:
        leader_ids = [row[0] for row in csv.reader(handle)][1:]
    positions = [leader_ids.index(i) for i in written[1:]]
    assert positions == sorted(positions)  # the leader's own order
    assert not (vfl["out"] / "validation_ids-follower.csv").exists()  # the leader's file only


def test_progress_shows_the_phases(vfl: dict[str, Any]) -> None:
    assert vfl["phases"] == ["aligning", "training", "exporting"]


def test_predict_keeps_the_leader_order_and_counts_dropped_rows(vfl: dict[str, Any]) -> None:
    work = vfl["work"]
    with open(work / "breast_leader.csv", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    with open(work / "breast_follower.csv", newline="") as handle:
        f_header, *f_rows = list(csv.reader(handle))
    leader_rows = rows[:60][::-1]  # a new order, reversed
    leader_ids = {row[0] for row in rows[:60]}
    # The follower holds 50 of the leader's 60 ids and 10 the leader does not have.
    follower_rows = [r for r in f_rows if r[0] in {row[0] for row in rows[:50]}] + [
        r for r in f_rows if r[0] not in leader_ids
    ][:10]
    for name, head, body in (("leader_in.csv", header, leader_rows), ("follower_in.csv", f_header, follower_rows)):
        with open(work / name, "w", newline="") as handle:
            csv.writer(handle).writerows([head, *body])
    done = enclavefl(
        "predict",
        str(vfl["job"]),
        "--input",
        f"leader={work / 'leader_in.csv'}",
        "--input",
        f"follower={work / 'follower_in.csv'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = [line.split(",")[0] for line in (vfl["out"] / "predictions.csv").read_text().splitlines()[1:]]
    held_by_both = {row[0] for row in rows[:50]}
    assert predicted == [row[0] for row in leader_rows if row[0] in held_by_both]
    summary = json.loads((vfl["out"] / "summary-predict.json").read_text())
    assert summary["parties"]["leader"]["dropped_rows"] == 10 and summary["parties"]["leader"]["input_rows"] == 60
    assert summary["parties"]["follower"]["dropped_rows"] == 10
    assert "leader: 10 of its 60 input rows are not held by every party" in done.stdout


def test_a_run_that_never_learns_is_flagged(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    job_file = write_vfl_demo(tmp_path)
    job = yaml.safe_load(job_file.read_text())
    job["training"].update(epochs=3, lr=1e-9, optimizer="sgd")
    del job["storage"]
    job_file.write_text(yaml.safe_dump(job))
    done = enclavefl("run", str(job_file), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    warnings = summary["health"]["warnings"]
    assert any("flat over the first 3 evaluations" in w for w in warnings), warnings
    assert "WARNING: validation log loss is flat" in done.stdout.replace("\n", " ")
    assert "run health: validation log loss is flat" in (tmp_path / "out" / "logs" / "leader.log").read_text()


def test_predict_with_wide_and_deep_data(tmp_path: Path) -> None:
    from enclavefl.data.synthetic import make_wide_deep_data

    (tmp_path / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    job_file = write_vfl_demo(tmp_path)
    job = yaml.safe_load(job_file.read_text())
    generate = {"rows": 300, "fields_per_party": 8, "vocab_size": 11}
    job["parties"][0]["data"] = {"kind": "wide-deep", "path": "wd/leader.npz", "generate": generate}
    job["parties"][1]["data"] = {"kind": "wide-deep", "path": "wd/follower_0.npz", "generate": generate}
    job["model"] = {
        "bottom": {
            "name": "wide_deep_follower",
            "args": {"num_fields": 8, "vocab_size": 11, "embedding_dim": 4, "out_features": 8},
        },
        "top": {
            "name": "wide_deep_leader",
            "args": {"num_fields": 8, "vocab_size": 11, "embedding_dim": 4, "hidden": [16, 8]},
        },
        "leader_bottom": False,
    }
    job["training"].update(epochs=1, alignment="tee-join", optimizer="adagrad")
    job_file.write_text(yaml.safe_dump(job))
    done = enclavefl("run", str(job_file))
    assert done.returncode == 0, done.stderr[-3000:]
    make_wide_deep_data(tmp_path / "new", 40, fields_per_party=8, vocab_size=11, seed=7)
    done = enclavefl(
        "predict",
        str(job_file),
        "--input",
        f"leader={tmp_path / 'new' / 'leader.npz'}",
        "--input",
        f"follower={tmp_path / 'new' / 'follower_0.npz'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out-vfl" / "summary-predict.json").read_text())
    lines = (tmp_path / "out-vfl" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "id,probability" and len(lines) - 1 == summary["rows"] > 0
    assert "auc" in summary["metrics"]  # the leader's file holds labels: the predictions are scored


def test_standardize_fits_each_party_on_its_training_rows_and_seals_it(vfl: dict[str, Any]) -> None:
    """preprocess.standardize: each party's statistics come from its own training rows only
    (not the validation rows) and travel sealed in its exported half, which predict loads."""
    import torch

    from enclavefl.jobs.config import load_job
    from enclavefl.jobs.vfl_job import build_bottom, build_leader_model, model_path
    from enclavefl.models.preprocess import Standardize
    from enclavefl.insecure import FileKeySource
    from enclavefl.vfl.export import load_model

    job = load_job(vfl["job"])
    held_out = set((vfl["out"] / "validation_ids.csv").read_text().split()[1:])
    key = FileKeySource(vfl["work"] / "keys" / "demo.key")
    for party, file, build in (
        ("leader", "breast_leader.csv", build_leader_model),
        ("follower", "breast_follower.csv", build_bottom),
    ):
        with open(vfl["work"] / file, newline="") as handle:
            header, *rows = list(csv.reader(handle))
        first = 2 if party == "leader" else 1  # id, (y,) x0..
        train = np.array([[float(v) for v in r[first:]] for r in rows if r[0] not in held_out], dtype=np.float32)
        model = load_model(
            build(job, train.shape[1]), model_path(vfl["out"], party), key=key, job_id=job.job.id, party=party
        )
        scaler = next(m for m in model.modules() if isinstance(m, Standardize))
        assert train.shape[0] == 455
        assert torch.allclose(scaler.mean, torch.from_numpy(train.mean(axis=0)), atol=1e-4)
        assert torch.allclose(scaler.std, torch.from_numpy(train.std(axis=0)), rtol=1e-3)


def test_standardize_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    from enclavefl.errors import ConfigError
    from enclavefl.jobs.config import load_job

    job_file = hfl_demo_job(tmp_path, preprocess={"standardize": True})
    with pytest.raises(ConfigError, match="preprocess.standardize: vertical"):
        load_job(job_file)


def _party_records(out: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == "party"]


def test_per_party_training_metrics_vfl(vfl: dict[str, Any]) -> None:
    parties = _party_records(vfl["out"])
    by_party = {(r["party"], r["step"]): r for r in parties}
    assert set(by_party) == {(p, e) for p in ("leader", "follower") for e in (1, 2, 3)}
    for epoch in (1, 2, 3):
        leader, follower = by_party[("leader", epoch)], by_party[("follower", epoch)]
        assert leader["loss"] > 0 and leader["compute_s"] > 0 and leader["examples"] == 455
        # What the follower sends (its activations) is what the leader receives, and back.
        assert follower["bytes_sent"] == leader["bytes_received"] == 455 * 8 * 4
        assert follower["bytes_received"] == leader["bytes_sent"] > 0
    assert (vfl["out"] / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_party_training_metrics_hfl(tmp_path: Path) -> None:

    job_file = hfl_demo_job(tmp_path, rounds=2)
    result = run_job(job_file, timeout_s=300)
    assert result.ok, result.summary
    parties = _party_records(result.out_dir)
    assert sorted((r["party"], r["step"]) for r in parties) == [
        (w, s) for w in ("worker-a", "worker-b") for s in (1, 2)
    ]
    for record in parties:
        assert record["loss"] > 0 and record["compute_s"] > 0 and record["examples"] > 600
        assert record["bytes_sent"] > 0 and record["bytes_received"] > 0
    assert result.summary["split"]["n_train"] == sum(r["examples"] for r in parties if r["step"] == 1)
