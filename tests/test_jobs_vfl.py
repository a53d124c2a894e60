"""Vertical jobs end to end: `enclavefl run`, `align` and `predict`, every party its own process."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from enclavefl.jobs.demo import DEMO_KEY, SIMULATED_POLICY, write_hfl_demo, write_vfl_demo
from enclavefl.seal.keys import create_key_file


def enclavefl(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enclavefl", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=cwd)


@pytest.fixture
def vfl_job(tmp_path: Path) -> Path:
    (tmp_path / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    create_key_file(tmp_path / DEMO_KEY)
    job_file = write_vfl_demo(tmp_path)
    job = yaml.safe_load(job_file.read_text())
    job["training"]["epochs"] = 3
    job_file.write_text(yaml.safe_dump(job))
    return job_file


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_align_then_train_reuses_the_sealed_alignment_then_predict(vfl_job: Path, tmp_path: Path) -> None:
    out = tmp_path / "out-vfl"
    aligned = enclavefl("align", str(vfl_job), cwd=tmp_path)
    assert aligned.returncode == 0, aligned.stderr[-3000:]
    assert "569 common samples (sealed" in aligned.stdout
    assert json.loads((out / "summary-align.json").read_text())["intersection"] == 569
    assert not (out / "summary.json").exists()  # align is not a training run

    trained = enclavefl("run", str(vfl_job), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "vfl" and summary["alignment"] == "ecdh-psi" and summary["intersection"] == 569
    assert summary["train_rows"] + summary["validation_rows"] == 569
    assert summary["rollback_protection"] == "peer-based"  # storage with a file: key, no broker
    assert summary["metrics"]["auc"] > 0.9 and set(summary["metrics"]) == {"accuracy", "auc", "logloss"}
    assert all(p["attested"] and p["tee"] == "simulated" for p in summary["parties"].values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["event"] == "eval"]  # (next to them: each party's training figures)
    assert [r["step"] for r in records] == [1, 2, 3] and all("auc" in r and "loss" in r for r in records)
    for party in ("leader", "follower"):
        assert "sealed alignment of 569 samples" in (out / "logs" / f"{party}.log").read_text()
        sealed = (out / "model" / f"{party}.sealed").read_bytes()
        assert b"PK" not in sealed[:64]  # sealed, not a plain torch zip archive

    # New rows for prediction: the follower holds only some of them, in its own order.
    follower_rows = rows(tmp_path / "breast_follower.csv")[:200]
    subset = tmp_path / "new_follower.csv"
    with open(subset, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(follower_rows[0]))
        writer.writeheader()
        writer.writerows(follower_rows)
    predicted = enclavefl("predict", str(vfl_job), "--input", "leader=breast_leader.csv",
                          "--input", f"follower={subset}", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "200 predictions written" in predicted.stdout
    predictions = rows(out / "predictions.csv")
    assert {r["id"] for r in predictions} == {r["id"] for r in follower_rows}
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in predictions)
    metrics = json.loads((out / "summary-predict.json").read_text())["metrics"]
    assert metrics["auc"] > 0.9  # the leader's input carries labels: the predictions are scored


def test_predict_before_training_names_the_missing_model(vfl_job: Path, tmp_path: Path) -> None:
    done = enclavefl("predict", str(vfl_job), "--input", "leader=breast_leader.csv",
                     "--input", "follower=breast_follower.csv", cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert "no exported model" in (tmp_path / "out-vfl" / "logs" / "leader.log").read_text()
    assert "Traceback" not in done.stderr


def test_predict_needs_an_input_for_every_party(vfl_job: Path, tmp_path: Path) -> None:
    done = enclavefl("predict", str(vfl_job), "--input", "leader=breast_leader.csv", cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "missing: ['follower']" in done.stderr
    done = enclavefl("predict", str(vfl_job), "--input", "leader", cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "expected NAME=PATH" in done.stderr


def test_align_refuses_a_horizontal_job(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    done = enclavefl("align", str(write_hfl_demo(tmp_path)), cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "step of vertical jobs" in done.stderr


@pytest.mark.slow  # two runs of every party (~1.5 min on a loaded machine)
def test_keep_best_exports_the_best_epoch_and_predict_reproduces_its_auc(vfl_job: Path, tmp_path: Path) -> None:
    job = yaml.safe_load(vfl_job.read_text())
    job["training"].update(epochs=6, lr=0.5)  # Adam this fast overshoots: later epochs are worse
    job["output"]["keep"] = "best"  # judged by the primary metric, auc
    vfl_job.write_text(yaml.safe_dump(job))
    out = tmp_path / "out-vfl"
    trained = enclavefl("run", str(vfl_job), "--write-split", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best"]["auc"]
    assert summary["final"]["auc"]["value"] < best["value"], summary["best"]  # the setting this test needs
    assert summary["exported"] == {"keep": "best", "epoch": best["step"], "by": "auc", "value": best["value"]}
    assert f"exported epoch {best['step']} (best auc {best['value']:.4f}), not the last" in trained.stdout

    # The validation rows, predicted by the exported halves: the best epoch's AUC.
    validation = {r["id"] for r in rows(out / "validation_ids.csv")}
    for party in ("leader", "follower"):
        source = rows(tmp_path / f"breast_{party}.csv")
        with open(tmp_path / f"valid_{party}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(source[0]))
            writer.writeheader()
            writer.writerows(r for r in source if r["id"] in validation)
    predicted = enclavefl("predict", str(vfl_job), "--input", "leader=valid_leader.csv",
                          "--input", "follower=valid_follower.csv", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    metrics = json.loads((out / "summary-predict.json").read_text())["metrics"]
    assert metrics["auc"] == pytest.approx(best["value"], abs=1e-6)
