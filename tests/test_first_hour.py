"""Issue 13, the first hour of a new user: keys, logs and quick-run caps."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from enclavefl.cli import main
from enclavefl.errors import ConfigError
from enclavefl.jobs.config import load_job
from enclavefl.jobs.demo import SIMULATED_POLICY, write_vfl_demo
from enclavefl.jobs.launcher import open_fresh_log
from enclavefl.jobs.quick import apply_quick_caps
from enclavefl.jobs.runtime import storage_key
from enclavefl.seal.keys import FileKeySource


def _vfl_job(tmp_path: Path, *, simulated: bool, key: str = "keys/deep/job.key") -> Path:
    (tmp_path / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    job_file = write_vfl_demo(tmp_path)
    job = yaml.safe_load(job_file.read_text())
    job["storage"]["key"] = f"file:{key}"
    if not simulated:
        job["tee"] = {"attester": "gramine"}
        (tmp_path / "policy.json").write_text(json.dumps({**SIMULATED_POLICY, "allow_simulated": False}))
    job_file.write_text(yaml.safe_dump(job))
    return job_file


def test_keygen_creates_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "hfl-default-credit" / "checkpoint.key"
    result = CliRunner().invoke(main, ["keygen", str(path)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(FileKeySource(path).kek()) == 32
    again = CliRunner().invoke(main, ["keygen", str(path)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_simulation_creates_a_missing_file_key_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = load_job(_vfl_job(tmp_path, simulated=True))
    with caplog.at_level(logging.WARNING):
        source = storage_key(job)
    key_path = tmp_path / "keys" / "deep" / "job.key"
    assert isinstance(source, FileKeySource) and source.path == key_path
    assert len(source.kek()) == 32 and stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert "INSECURE" in caplog.text and str(key_path) in caplog.text
    first = key_path.read_bytes()
    storage_key(job)  # an existing key is kept, never replaced
    assert key_path.read_bytes() == first


def test_outside_simulation_a_missing_key_names_keygen(tmp_path: Path) -> None:
    job = load_job(_vfl_job(tmp_path, simulated=False))
    source = storage_key(job)
    assert source is not None and not (tmp_path / "keys").exists()
    with pytest.raises(ConfigError) as err:
        source.kek()
    assert f"enclavefl keygen {tmp_path / 'keys' / 'deep' / 'job.key'}" in str(err.value)


def test_party_logs_start_fresh_and_keep_the_previous_run_once(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "guest.log"
    for run in ("first", "second", "third"):
        with open_fresh_log(log_path) as handle:
            handle.write(f"{run} run\n".encode())
    assert log_path.read_text() == "third run\n"
    assert (tmp_path / "logs" / "guest.log.1").read_text() == "second run\n"
    assert sorted(p.name for p in log_path.parent.iterdir()) == ["guest.log", "guest.log.1"]


def test_quick_caps_apply_to_simulated_jobs_only(caplog: pytest.LogCaptureFixture) -> None:
    job = {
        "tee": {"attester": "simulated"},
        "strategy": {"rounds": 10},
        "parties": [{"name": "w", "data": {"kind": "csv", "path": "x.csv"}},
                    {"name": "c", "data": {"kind": "criteo", "path": "c.txt", "limit": 50}}],
        "evaluation": {"data": {"kind": "csv", "path": "t.csv"}},
    }
    env = {"ENCLAVEFL_MAX_ROUNDS": "2", "ENCLAVEFL_MAX_ROWS": "100"}
    capped = apply_quick_caps(job, env)
    assert capped["strategy"]["rounds"] == 2
    assert [p["data"]["limit"] for p in capped["parties"]] == [100, 50]
    assert capped["evaluation"]["data"]["limit"] == 100
    assert job["strategy"]["rounds"] == 10  # the parsed file itself is not changed
    real = {**job, "tee": {"attester": "gramine"}}
    with caplog.at_level(logging.WARNING):
        assert apply_quick_caps(real, env) == real
    assert "only to jobs with simulated attestation" in caplog.text
    with pytest.raises(ConfigError, match="ENCLAVEFL_MAX_ROUNDS"):
        apply_quick_caps(job, {"ENCLAVEFL_MAX_ROUNDS": "zero"})


def test_quick_caps_reach_the_loaded_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job_file = _vfl_job(tmp_path, simulated=True)
    monkeypatch.setenv("ENCLAVEFL_MAX_ROUNDS", "1")
    monkeypatch.setenv("ENCLAVEFL_MAX_ROWS", "40")
    job = load_job(job_file)
    assert job.training.epochs == 1
    assert all(p.data.limit == 40 for p in job.parties)


def test_csv_limit_reads_the_first_rows(tmp_path: Path) -> None:
    from enclavefl.jobs.datasets import load_party_data

    job = load_job(_vfl_job(tmp_path, simulated=True))
    spec = job.leader().data.model_copy(update={"limit": 7})
    data = load_party_data(spec, seed=0)
    full = load_party_data(job.leader().data, seed=0)
    assert len(data) == 7 and list(data.ids) == list(full.ids[:7])
    assert os.fspath(spec.path) == os.fspath(job.leader().data.path)


def test_auc_on_a_multiclass_job_is_refused_at_config_time(tmp_path: Path) -> None:
    from enclavefl.jobs.demo import write_hfl_demo

    (tmp_path / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    job_file = write_hfl_demo(tmp_path)  # digits: 10 classes
    job = yaml.safe_load(job_file.read_text())
    job["evaluation"]["metrics"] = ["accuracy", "auc"]
    job_file.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError) as err:
        load_job(job_file)
    assert "evaluation.metrics: auc needs a binary task" in err.value.reason
    assert "model.args.out_features is 10" in err.value.reason
    vfl_file = _vfl_job(tmp_path, simulated=True)
    vfl = yaml.safe_load(vfl_file.read_text())
    vfl["model"]["top"]["args"]["out_features"] = 3
    vfl_file.write_text(yaml.safe_dump(vfl))
    with pytest.raises(ConfigError, match="training.metrics: auc needs a binary task"):
        load_job(vfl_file)
