"""`enclavefl run` / `party` end to end: every party its own attested process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hfl_demo_job
import yaml

from enclavefl.jobs.demo import SIMULATED_POLICY


def enclavefl(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enclavefl", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def hfl_job(tmp_path: Path) -> Path:
    return hfl_demo_job(tmp_path, rounds=3)


def test_run_writes_metrics_summary_plot_and_logs(hfl_job: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = enclavefl("run", str(hfl_job), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job"] == "demo-hfl-digits" and summary["mode"] == "hfl"
    assert summary["strategy"] == "fedavg" and summary["rounds"] == 3
    assert summary["rollback_protection"] == "none"  # no storage
    assert summary["metrics"]["accuracy"] > 0.8
    assert "logloss" in summary["metrics"] and summary["wall_s"] > 0
    assert set(summary["parties"]) == {"server", "worker-a", "worker-b"}
    for party in summary["parties"].values():
        assert party["tee"] == "simulated" and party["attested"] is True
        assert len(party["mr_enclave"]) == 64
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("server", "worker-a", "worker-b"):
        log = (out / "logs" / f"{name}.log").read_text()
        assert "PRIVATE KEY" not in log
    assert "INSECURE" in (out / "logs" / "server.log").read_text()


def test_run_fails_when_policy_refuses_simulated(hfl_job: Path, tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text(json.dumps({**SIMULATED_POLICY, "allow_simulated": False}))
    done = enclavefl("run", str(hfl_job), "--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr.splitlines()[-1]
    assert "policy allows simulated" in done.stderr or "simulated" in done.stderr


def test_party_with_unknown_name_exits_2(hfl_job: Path) -> None:
    done = enclavefl("party", str(hfl_job), "--name", "nobody", timeout=60)
    assert done.returncode == 2
    assert "no party 'nobody'" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_with_bad_job_file_names_the_field(hfl_job: Path) -> None:
    job = yaml.safe_load(hfl_job.read_text())
    job["parties"][0]["role"] = "leader"
    hfl_job.write_text(yaml.safe_dump(job))
    done = enclavefl("run", str(hfl_job), timeout=60)
    assert done.returncode == 2
    assert "parties[0].role" in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_runs_both_jobs_and_prints_the_result_table(tmp_path: Path) -> None:
    done = enclavefl("demo", "--work", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "INSECURE" in done.stdout and "enclavefl results" in done.stdout
    hfl = json.loads((tmp_path / "demo" / "out-hfl" / "summary.json").read_text())
    vfl = json.loads((tmp_path / "demo" / "out-vfl" / "summary.json").read_text())
    assert hfl["metrics"]["accuracy"] > 0.9 and vfl["metrics"]["auc"] > 0.95
    assert all(p["attested"] for s in (hfl, vfl) for p in s["parties"].values())


def test_gramine_party_provisions_the_checkpoint_mount_key(tmp_path: Path) -> None:
    """Under Gramine-SGX a broker:/file: storage key becomes the encrypted mount's key;
    a temporary directory stands in for /dev/attestation/keys."""
    import dataclasses

    from enclavefl.jobs.config import load_job
    from enclavefl.jobs.demo import DEMO_KEY, write_vfl_demo
    from enclavefl.jobs.gramine import CHECKPOINT_KEY_NAME
    from enclavefl.jobs.runtime import PartyRuntime
    from enclavefl.seal.keys import create_key_file

    (tmp_path / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    create_key_file(tmp_path / DEMO_KEY)
    job_file = write_vfl_demo(tmp_path)
    runtime = PartyRuntime.create(load_job(job_file), job_file, "leader", tmp_path / "out")
    keys = tmp_path / "keys"
    keys.mkdir()
    assert runtime.prepare_storage(keys_dir=keys) is False  # simulated: no Gramine mount
    assert not any(keys.iterdir())
    sgx = dataclasses.replace(runtime, tee="sgx")
    assert sgx.prepare_storage(keys_dir=keys) is True
    mount_key = (keys / CHECKPOINT_KEY_NAME).read_bytes()
    assert len(mount_key) == 16
    assert mount_key.hex() not in (tmp_path / DEMO_KEY).read_text()  # derived, not the sealing key itself


def test_unreadable_storage_key_fails_at_start_and_stops_the_job(hfl_job: Path, tmp_path: Path) -> None:
    # (A missing file: key is created in simulation mode; a key others can read is refused.)
    job = yaml.safe_load(hfl_job.read_text())
    job["storage"] = {"checkpoint_dir": "ckpt", "key": "file:open.key", "checkpoint_every": 1}
    hfl_job.write_text(yaml.safe_dump(job))
    (tmp_path / "open.key").write_text("ab" * 32 + "\n")
    (tmp_path / "open.key").chmod(0o644)
    done = enclavefl("run", str(hfl_job), "--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 1 and "party server failed first (exit 2)" in done.stderr
    server_log = (tmp_path / "out" / "logs" / "server.log").read_text()
    assert "open.key is accessible by other users" in server_log and "Traceback" not in server_log
    assert "joined" not in server_log  # it failed before serving anyone


def test_async_sgd_job_exits_0_with_every_worker_told(hfl_job: Path, tmp_path: Path) -> None:
    """A short async-sgd job: one worker may finish every step before the other uploads
    or even joins; both must get the final state and exit 0 (issue 12, item 5)."""
    job = yaml.safe_load(hfl_job.read_text())
    job["strategy"] = {"name": "async-sgd", "steps": 12, "batch_size": 16, "lr": 0.1}
    hfl_job.write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    done = enclavefl("run", str(hfl_job), "--out", str(out), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "async-sgd" and summary["rounds"] == 12
    assert {name: p["exit_code"] for name, p in summary["parties"].items()} == {
        "server": 0, "worker-a": 0, "worker-b": 0,
    }
    for name in ("worker-a", "worker-b"):
        assert "done at version 12" in (out / "logs" / f"{name}.log").read_text()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_party_start_resolves_prctl_before_fork() -> None:
    """Between fork and exec the child only calls the prctl resolved at import: loading libc
    there can deadlock on a lock another thread held at fork (issue 12, item 12)."""
    code = """
import ctypes, signal
import enclavefl.jobs.launcher as launcher
prctl = ctypes.CDLL(None, use_errno=True).prctl
def no_loading(*args, **kwargs):
    raise AssertionError("a library was loaded in the child")
ctypes.CDLL = no_loading
launcher._die_with_parent()
value = ctypes.c_int()
prctl(2, ctypes.byref(value))  # PR_GET_PDEATHSIG
assert value.value == signal.SIGTERM, value.value
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _party_fails_before_attesting(job_file: Path, out: Path, name: str = "worker-a") -> str:
    done = enclavefl("party", str(job_file), "--name", name, "--out", str(out), timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (out / "parties" / f"{name}.json").exists()  # written once it attested: it never did
    return done.stderr


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"label": "target"}, "no label column 'target' in header"),
        ({"path": sys.executable}, "not a CSV text file (not UTF-8"),
    ],
    ids=["missing-label-column", "binary-file"],
)
def test_bad_worker_data_is_exit_2_before_attestation(
    hfl_job: Path, tmp_path: Path, change: dict[str, str], fragment: str
) -> None:
    job = yaml.safe_load(hfl_job.read_text())
    job["parties"][1]["data"].update(change)
    hfl_job.write_text(yaml.safe_dump(job))
    assert fragment in _party_fails_before_attesting(hfl_job, tmp_path / "out")


def test_bad_model_argument_is_exit_2_naming_the_field(hfl_job: Path, tmp_path: Path) -> None:
    job = yaml.safe_load(hfl_job.read_text())
    job["model"]["args"]["in_features"] = "x"
    hfl_job.write_text(yaml.safe_dump(job))
    stderr = _party_fails_before_attesting(hfl_job, tmp_path / "out", name="server")
    assert "model.args: 'mlp' refused its arguments" in stderr


def test_deeply_nested_job_file_is_exit_2(tmp_path: Path) -> None:
    job_file = tmp_path / "deep.yaml"
    job_file.write_text("job:\n  x: " + "[" * 6000 + "]" * 6000 + "\n")
    done = enclavefl("run", str(job_file), timeout=60)
    assert done.returncode == 2 and "nested deeper than" in done.stderr
    assert "Traceback" not in done.stderr
