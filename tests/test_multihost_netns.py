"""Real multi-host runs without a cluster: every party of a job runs as `enclavefl party`
in its own Linux network namespace (its own address, a veth cable to a bridge), and one
party's cable is pulled mid-run and plugged back in.

Short cuts (the default tests) are bridged by TCP itself: the connection stalls and goes
on. Long cuts (marked slow) last until the cut party's own transport notices the dead
connection (gRPC keepalive), so it reconnects and attests again once the cable is back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from netns import NetnsUnavailable, Network, Process, network, probe

from enclavefl.jobs.demo import DEMO_KEY, SIMULATED_POLICY, write_hfl_demo, write_vfl_demo
from enclavefl.seal.keys import create_key_file

# Generous limits for waits that only guard against a hung job (never timing assertions).
WAIT_S = 180.0
# gRPC keepalive fails a dead connection within about 20 s (net/exchange.py).
NOTICE_S = 60.0
POLL_S = 0.2


@pytest.fixture(scope="module", autouse=True)
def _namespaces() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are a Linux feature")
    try:
        probe()
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot build network namespaces here: {exc}")


# --------------------------------------------------------------------------- helpers


def _party_env() -> dict[str, str]:
    # Parties share two cores: one torch thread each, as the local launcher does.
    return {**os.environ, "ENCLAVEFL_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(net: Network, job_file: Path, name: str, out: Path) -> Process:
    command = [sys.executable, "-m", "enclavefl", "party", str(job_file), "--name", name, "--out", str(out)]
    return net.spawn(name, command, out / "party.log", _party_env())


def _logs(processes: dict[str, Process], lines: int = 25) -> str:
    parts = []
    for name, process in processes.items():
        text = process.log_path.read_text(errors="replace").splitlines() if process.log_path.exists() else []
        parts.append(f"--- {name} (exit {process.popen.poll()}), last lines of {process.log_path}:\n"
                     + "\n".join(text[-lines:]))
    return "\n".join(parts)


def _wait_for(
    what: str, ready: Callable[[], bool], processes: dict[str, Process], *, limit_s: float = WAIT_S
) -> None:
    """Poll until `ready()`; fail early if a party died, or after `limit_s` (a hung job)."""
    deadline = time.monotonic() + limit_s
    while not ready():
        failed = {n: p.popen.poll() for n, p in processes.items() if p.popen.poll() not in (None, 0)}
        if failed:
            pytest.fail(f"waiting for {what}: parties {failed} failed\n{_logs(processes)}")
        if time.monotonic() > deadline:
            pytest.fail(f"waiting for {what}: not after {limit_s:g} s\n{_logs(processes)}")
        time.sleep(POLL_S)


def _wait_exit(processes: dict[str, Process]) -> dict[str, int | None]:
    _wait_for("every party to exit", lambda: all(p.popen.poll() is not None for p in processes.values()), processes)
    return {name: p.popen.poll() for name, p in processes.items()}


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a metrics.jsonl the coordinator is appending to (without the
    parties' own training figures, `event: party`)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines() if line.strip()]
    return [r for r in lines if r.get("event") != "party"]


def _csv_rows(path: Path) -> int:
    return len(path.read_text().splitlines()) - 1  # minus the header


def _log(process: Process) -> str:
    return process.log_path.read_text(errors="replace")


def _edit_job(job_file: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    job = yaml.safe_load(job_file.read_text())
    edit(job)
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))


# --------------------------------------------------------------------------- horizontal


def _run_hfl_cut(work: Path, *, rounds: int, long_cut: bool) -> None:
    """Server + 2 workers on 3 hosts; worker-b's cable is pulled mid-run, then plugged back."""
    (work / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    job_file = write_hfl_demo(work)
    share = {w: _csv_rows(work / f"digits_{w}.csv") for w in ("worker-a", "worker-b")}
    both = share["worker-a"] + share["worker-b"]
    names = ("server", "worker-a", "worker-b")
    with network(names) as net:
        server_target = f"{net.addresses['server']}:50051"

        def edit(job: dict[str, Any]) -> None:
            job["parties"][0]["address"] = server_target
            # Rounds that last a little (local epochs), a quorum of one and a short round
            # timeout: the server goes on with whoever is there. After the cable is back,
            # worker-b's next TCP retransmission can be seconds away (exponential RTO), so
            # the rounds left must outlast that or the job ends before it returns.
            job["strategy"].update(rounds=rounds, local_epochs=64, min_workers=1, round_timeout_s=3.0)

        _edit_job(job_file, edit)
        outs = {name: work / f"out-{name}" for name in names}
        procs = {name: _start(net, job_file, name, outs[name]) for name in names}
        metrics = outs["server"] / "metrics.jsonl"

        def closed() -> list[dict[str, Any]]:
            return [r for r in _records(metrics) if r.get("event") == "round"]

        # 1. A few rounds, the last one with both workers: cut worker-b's cable.
        _wait_for("rounds with both workers", lambda: len(closed()) >= 2 and closed()[-1]["examples"] == both, procs)
        net.cut("worker-b")
        cut_at = len(closed())

        # 2. The job goes on: rounds close with worker-a's examples alone.
        def solo_rounds() -> int:
            return sum(r["examples"] == share["worker-a"] for r in closed()[cut_at:])

        _wait_for("rounds with worker-a alone", lambda: solo_rounds() >= 3, procs)
        if long_cut:
            # The cut worker's transport notices the dead connection while the cable is out.
            _wait_for("worker-b to notice the dead link",
                      lambda: "lost the parameter server" in _log(procs["worker-b"]), procs, limit_s=NOTICE_S)
        net.restore("worker-b")
        restored_at = len(closed())

        # 3. worker-b contributes again.
        _wait_for("a round with both workers again",
                  lambda: any(r["examples"] == both for r in closed()[restored_at:]), procs)

        # 4. The job completes and every party exits cleanly.
        codes = _wait_exit(procs)
        assert codes == dict.fromkeys(names, 0), _logs(procs)

    steps = [r["step"] for r in closed()]
    assert steps == list(range(1, rounds + 1))
    assert solo_rounds() >= 3
    result = json.loads((outs["server"] / "result.json").read_text())
    assert result["extra"]["rounds"] == rounds
    counts = result["extra"]["workers"]["worker-b"]
    assert counts["dropped"] >= 1
    assert 1 <= counts["contributions"] <= rounds - 3
    assert {p: result["peers"][p]["attested"] for p in ("worker-a", "worker-b")} == {"worker-a": True, "worker-b": True}
    for worker in ("worker-a", "worker-b"):
        record = json.loads((outs[worker] / "parties" / f"{worker}.json").read_text())
        assert record["verified_coordinator"] is True
    server_log = _log(procs["server"])
    # Dropped at the round it missed, and back afterwards.
    assert 0 <= server_log.rfind("worker worker-b missed round") < server_log.rfind("worker worker-b is back")
    worker_log = _log(procs["worker-b"])
    assert f"party worker-b done at version {rounds}" in worker_log
    if long_cut:
        assert f"joined {server_target} at version" in worker_log.split("lost the parameter server", 1)[1]
        assert counts["joins"] >= 2


def test_hfl_job_goes_on_without_a_cut_worker_and_takes_it_back(tmp_path: Path) -> None:
    _run_hfl_cut(tmp_path, rounds=50, long_cut=False)


@pytest.mark.slow
def test_hfl_worker_notices_a_long_cut_and_joins_again(tmp_path: Path) -> None:
    _run_hfl_cut(tmp_path, rounds=200, long_cut=True)


# --------------------------------------------------------------------------- vertical


def _run_vfl_cut(work: Path, *, epochs: int, long_cut: bool) -> None:
    """Leader + follower on 2 hosts; the follower's cable is pulled mid-training, then plugged back."""
    (work / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    create_key_file(work / DEMO_KEY)
    job_file = write_vfl_demo(work)
    names = ("leader", "follower")
    with network(names) as net:

        def edit(job: dict[str, Any]) -> None:
            job["parties"][0]["address"] = f"{net.addresses['leader']}:50052"
            job["training"]["epochs"] = epochs

        _edit_job(job_file, edit)
        outs = {name: work / f"out-{name}" for name in names}
        procs = {name: _start(net, job_file, name, outs[name]) for name in names}
        metrics = outs["leader"] / "metrics.jsonl"

        _wait_for("two epochs", lambda: len(_records(metrics)) >= 2, procs)
        net.cut("follower")
        at_cut = len(_records(metrics))
        if long_cut:
            _wait_for("the follower to notice the dead link",
                      lambda: "attesting again" in _log(procs["follower"]), procs, limit_s=NOTICE_S)
        else:
            time.sleep(4.0)  # a few seconds without a cable
        # Every iteration needs the follower's activations: at most the one in flight ends.
        during_cut = len(_records(metrics))
        net.restore("follower")

        codes = _wait_exit(procs)
        assert codes == dict.fromkeys(names, 0), _logs(procs)

    assert during_cut <= at_cut + 1
    records = _records(metrics)
    result = json.loads((outs["leader"] / "result.json").read_text())
    iterations = result["extra"]["iterations"]
    per_epoch = iterations // epochs
    assert iterations == per_epoch * epochs
    # Each epoch evaluated exactly once, at its last iteration, and nothing resumed or rewound.
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert [r["iteration"] for r in records] == [e * per_epoch - 1 for e in range(1, epochs + 1)]
    assert result["extra"]["epochs"] == epochs
    assert result["extra"]["resumed_from"] == -1
    assert result["peers"]["follower"]["attested"] is True
    assert result["metrics"]["accuracy"] > 0.9
    follower_log, leader_log = _log(procs["follower"]), _log(procs["leader"])
    for epoch in range(1, epochs + 1):
        assert follower_log.count(f"follower: epoch {epoch}/{epochs} done") == 1
    assert f"follower follower: {iterations} iterations" in follower_log
    # One bridge session throughout: joined once, no rewind to a checkpoint.
    assert leader_log.count("follower follower joined at iteration") == 1
    assert "goes back" not in leader_log
    if long_cut:
        # The follower reconnected and was attested and admitted a second time.
        assert leader_log.count("admitted party follower attested") == 2
        assert follower_log.count("party follower admitted by") == 2


def test_vfl_training_survives_a_cut_follower_link(tmp_path: Path) -> None:
    _run_vfl_cut(tmp_path, epochs=40, long_cut=False)


@pytest.mark.slow
def test_vfl_follower_notices_a_long_cut_and_reconnects(tmp_path: Path) -> None:
    _run_vfl_cut(tmp_path, epochs=40, long_cut=True)
