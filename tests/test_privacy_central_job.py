"""Worker-level (central) DP selected from a job file: `privacy.mechanism: dp-fedavg`."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import sim_credentials, sim_measurement, sim_policy
import torch
import yaml

from enclavefl.errors import ConfigError
from enclavefl.hfl.checkpoint import CheckpointStore
from enclavefl.hfl.dp import DpFedAvg
from enclavefl.hfl.server import ParameterServer
from enclavefl.hfl.worker import Worker, builtin_trainer
from enclavefl.jobs.config import load_job
from enclavefl.jobs.demo import SIMULATED_POLICY, write_hfl_demo
from enclavefl.models import mlp
from enclavefl.net.admission import PartyCredentials
from enclavefl.net.client import AttestedClient, RetryPolicy
from enclavefl.net.server import AttestedServer
from enclavefl.privacy.rdp import RdpAccountant
from enclavefl.seal.keys import FileKeySource, create_key_file

BUDGET = {"unit": "worker", "max_epsilon": 8.0, "delta": 1e-5}


def enclavefl(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enclavefl", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def central_dp_job(tmp_path: Path, privacy: dict[str, Any], *, rounds: int = 3) -> Path:
    """The digits demo with a third worker (the second half split in two), a worker-level budget."""
    (tmp_path / "policy.json").write_text(json.dumps({**SIMULATED_POLICY, "privacy": BUDGET}))
    job_file = write_hfl_demo(tmp_path)
    job = yaml.safe_load(job_file.read_text())
    lines = (tmp_path / "digits_worker-b.csv").read_text().splitlines()
    half = 1 + (len(lines) - 1) // 2
    (tmp_path / "digits_worker-b.csv").write_text("\n".join(lines[:half]) + "\n")
    (tmp_path / "digits_worker-c.csv").write_text("\n".join([lines[0], *lines[half:]]) + "\n")
    job["parties"].append({"name": "worker-c", "role": "worker",
                           "data": {"kind": "csv", "path": "digits_worker-c.csv", "label": "y"}})
    job["strategy"]["rounds"] = rounds
    job["privacy"] = privacy
    job_file.write_text(yaml.safe_dump(job))
    return job_file


@pytest.mark.integration  # end to end (parties over gRPC, or subprocesses): `make test`, not `make test-unit`
def test_central_dp_job_trains_and_reports_epsilon_per_round(tmp_path: Path) -> None:
    job_file = central_dp_job(tmp_path, {"mechanism": "dp-fedavg", "max_update_norm": 1.0, "fraction": 1.0})
    out = tmp_path / "out"
    done = enclavefl("run", str(job_file), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and "stopped" not in summary
    spent = summary["parties"]["server"]["privacy"]
    assert spent["dp_accountant"] == "rdp" and spent["dp_rounds"] == 3 and spent["dp_delta"] == 1e-5
    # Calibrated to the policy's budget over the 3 planned rounds: spent all but a sliver of it.
    assert 7.0 < spent["dp_epsilon"] <= 8.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "round"]
    assert [r["step"] for r in rounds] == [1, 2, 3]
    epsilons = [r["dp_epsilon"] for r in rounds]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert epsilons[-1] == pytest.approx(spent["dp_epsilon"])
    assert all(r["dp_sampled_workers"] == 3 for r in rounds)  # fraction 1: every worker


@pytest.mark.integration  # end to end (parties over gRPC, or subprocesses): `make test`, not `make test-unit`
def test_over_budget_central_dp_job_is_refused_before_training_naming_privacy(tmp_path: Path) -> None:
    # sigma 0.3 over 3 unsampled rounds spends far more than epsilon 8.
    job_file = central_dp_job(tmp_path, {"mechanism": "dp-fedavg", "noise_multiplier": 0.3})
    out = tmp_path / "out"
    done = enclavefl("run", str(job_file), "--out", str(out), timeout=120)
    assert done.returncode == 1
    assert "rejected: privacy: 3 planned DP-FedAvg rounds" in done.stderr, done.stderr[-3000:]
    assert "spend epsilon 42.8" in done.stderr  # RDP of 3 Gaussian steps at sigma 0.3, delta 1e-5
    assert "Traceback" not in done.stderr.splitlines()[-1]
    assert not (out / "metrics.jsonl").exists() or not any(
        json.loads(line).get("event") == "round" for line in (out / "metrics.jsonl").read_text().splitlines())


def test_dp_fedavg_needs_strategy_fedavg_and_its_own_settings(tmp_path: Path) -> None:
    job_file = central_dp_job(tmp_path, {"mechanism": "dp-fedavg"})
    job = yaml.safe_load(job_file.read_text())
    job["strategy"]["name"] = "fedadam"
    job_file.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match="privacy.mechanism"):
        load_job(job_file)
    job["strategy"]["name"] = "fedavg"
    job["privacy"] = {"mechanism": "dp-sgd", "fraction": 0.5}
    job_file.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match="fraction"):
        load_job(job_file)


@pytest.mark.usefixtures("one_torch_thread")  # parties share the cores in this process
def test_server_stops_at_the_budget_with_its_last_checkpoint_sealed(tmp_path: Path) -> None:
    good = sim_measurement(b"central dp")
    # A budget for exactly 2 rounds at sigma 1 (every worker sampled); the run plans 6.
    two, three = RdpAccountant(), RdpAccountant()
    two.step(noise_multiplier=1.0, sample_rate=1.0, steps=2)
    three.step(noise_multiplier=1.0, sample_rate=1.0, steps=3)
    budget = (two.epsilon(1e-5) + three.epsilon(1e-5)) / 2
    policy = sim_policy(good, privacy={"unit": "worker", "max_epsilon": budget, "delta": 1e-5})

    @functools.cache
    def credentials(party: str) -> PartyCredentials:
        return sim_credentials(party, good, policy, "central-dp")

    store = CheckpointStore(tmp_path / "ckpt", key=FileKeySource(create_key_file(tmp_path / "k").path),
                            job_id="central-dp")
    torch.manual_seed(0)
    model = mlp(6, (8,), 1)
    strategy = DpFedAvg(fraction=1.0, clip=1.0, delta=1e-5, rounds=6, population=2, noise_multiplier=1.0,
                        max_epsilon=budget)
    server = AttestedServer(credentials("server"), port=0, max_workers=8)
    ps = ParameterServer(server, strategy, model=model, workers=["a", "b"], total=6, min_workers=2,
                         checkpoints=store, round_timeout_s=60)
    port = server.start()
    results: dict[str, Any] = {}

    def body(party: str, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(128, 6, generator=g)
        train = (x, (x[:, 0] > 0).float())
        torch.manual_seed(0)
        trainer = builtin_trainer(mlp(6, (8,), 1), train, batch_size=32, lr=0.1)
        client = AttestedClient(f"127.0.0.1:{port}", credentials(party),
                                retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05))
        results[party] = Worker(client, trainer).run()

    threads = [threading.Thread(target=body, args=(p, i), daemon=True) for i, p in enumerate("ab")]
    for thread in threads:
        thread.start()
    try:
        summary = ps.run()
        assert ps.linger(30.0) == []
    finally:
        server.stop(grace_s=2.0)  # as run_server: the workers' last replies finish
        for thread in threads:
            thread.join(timeout=60)
    assert summary["stopped"] == "privacy budget"
    assert summary["version"] == 2
    assert strategy.central.epsilon <= budget and strategy.central.accountant.steps == 2
    latest = store.load_latest()
    assert latest is not None and latest[0] == 2
    # The workers end with the run, at its last state.
    assert {p: r["version"] for p, r in results.items()} == {"a": 2, "b": 2}

