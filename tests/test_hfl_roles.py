"""Horizontal FL end to end over the attested channel (simulated evidence, loopback):
parameter server and workers, faults, resume, admission, sparse rows, the upload gate."""

from __future__ import annotations

import copy
import gc
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from enclavefl.data import load_fate_csv
from enclavefl.errors import Rejected, SealError, UsageError
from enclavefl.hfl import wire
from enclavefl.hfl.checkpoint import CheckpointStore
from enclavefl.train.metrics import binary_auc
from enclavefl.hfl.server import ParameterServer, QuorumLost
from enclavefl.net.flow import UploadGate
from enclavefl.hfl.registry import make_strategy
from enclavefl.hfl.strategies import GradContribution, grad_contribution
from enclavefl.hfl.worker import Worker, evaluate
from enclavefl.models import DLRM, mlp
from enclavefl.net.admission import PartyCredentials
from enclavefl.net.client import AttestedClient, RetryPolicy
from enclavefl.net.errors import PeerRefused
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import Message, TensorSpec
from enclavefl.seal.keys import FileKeySource, create_key_file
from enclavefl.tee.measure import Measurement

from conftest import shared_file, sim_credentials, sim_measurement, sim_policy

GOOD = sim_measurement(b"hfl enclave", b"hfl signer")
OTHER = sim_measurement(b"tampered enclave", b"hfl signer")
POLICY = sim_policy(GOOD)
JOB = "hfl-test"
SPAWN = mp.get_context("spawn")


# Parties share the two cores: one torch thread each (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def credentials(party: str, measurement: Measurement = GOOD) -> PartyCredentials:
    return sim_credentials(party, measurement, POLICY, JOB)


def attested_server(port: int = 0) -> AttestedServer:
    return AttestedServer(credentials("server"), port=port, max_workers=12)


def client(port: int, party: str, measurement: Measurement = GOOD) -> AttestedClient:
    return AttestedClient(
        f"127.0.0.1:{port}", credentials(party, measurement), retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05)
    )


class Federation:
    """A parameter server on loopback and worker threads; `run()` returns both summaries."""

    def __init__(self, server: AttestedServer, ps: ParameterServer) -> None:
        self.server = server
        self.ps = ps
        self.port = server.start()
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        self._threads: list[threading.Thread] = []

    def worker(self, party: str, build: Callable[[AttestedClient], Worker], measurement: Measurement = GOOD) -> None:
        def body() -> None:
            try:
                self.results[party] = build(client(self.port, party, measurement)).run()
            except BaseException as exc:  # reported by run() below
                self.errors[party] = exc

        thread = threading.Thread(target=body, name=f"worker-{party}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def run(self) -> dict[str, Any]:
        try:
            summary = self.ps.run()
        except BaseException:
            self.server.stop(grace_s=0)  # the workers then give up reconnecting
            self._join_workers()
            raise
        self._join_workers()
        self.server.stop(grace_s=1.0)
        return summary

    def _join_workers(self) -> None:
        for thread in self._threads:
            thread.join(timeout=60)


def tiny_model(seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(6, (8,), classes)


def blobs(rows: int, seed: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (rows,), generator=g)
    x = torch.randn(rows, 6, generator=g) + F.one_hot(y, 6).float() * 2
    return x, y


# -- sync-sgd equals training on the union of the batches ----------------------------------


def test_sync_sgd_matches_one_process_on_the_union_of_batches() -> None:
    steps, sizes = 5, {"a": 4, "b": 12}
    data = {party: blobs(size * steps, seed=i) for i, (party, size) in enumerate(sizes.items())}
    held_out = {party: blobs(30, seed=10 + i) for i, party in enumerate(sizes)}
    initial = tiny_model()
    reference = copy.deepcopy(initial)

    strategy = make_strategy("sync-sgd", copy.deepcopy(initial), lr=0.1, momentum=0.9)
    server = attested_server()
    ps = ParameterServer(server, strategy, workers=list(sizes), total=steps, round_timeout_s=30, eval_every=steps)
    fed = Federation(server, ps)
    for party, size in sizes.items():
        fed.worker(party, lambda c, p=party, s=size: Worker.for_model(
            c, tiny_model(seed=7), data[p], batch_size=s, shuffle=False, eval_data=held_out[p]))
    summary = fed.run()
    assert not fed.errors, fed.errors

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x = torch.cat([data[p][0][step * s : (step + 1) * s] for p, s in sizes.items()])
        y = torch.cat([data[p][1][step * s : (step + 1) * s] for p, s in sizes.items()])
        optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        optimizer.step()

    assert summary["version"] == steps
    for (name, got), want in zip(ps.model.named_parameters(), reference.parameters(), strict=False):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    for party in sizes:
        assert fed.results[party]["contributions"] == steps
        assert fed.results[party]["version"] == steps and fed.results[party]["done"]
    # The workers' pooled evaluation equals evaluating the server's model on the union.
    pooled = evaluate(ps.model, [torch.cat([held_out[p][i] for p in sizes]) for i in (0, 1)]).summary()
    final = summary["final_metrics"]["workers"]
    assert final["parties"] == 2 and final["examples"] == 60
    assert final["accuracy"] == pytest.approx(pooled["accuracy"])
    assert final["log_loss"] == pytest.approx(pooled["log_loss"])


# -- fedavg reaches the centralized AUC on default_credit -----------------------------------


def _credit(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = load_fate_csv(shared_file("tabular", f"default_credit_homo_{name}.csv"))
    return torch.from_numpy(table.X), torch.from_numpy(table.y)


def test_fedavg_on_default_credit_reaches_the_centralized_auc() -> None:
    parties = ("guest", "host_1", "host_2")
    train = {p: _credit(p) for p in parties}
    test_x, test_y = _credit("test")
    events: list[dict[str, Any]] = []
    torch.manual_seed(0)
    strategy = make_strategy("fedavg", mlp(23, (64, 32), 1))
    server = attested_server()
    ps = ParameterServer(
        server, strategy, workers=parties, total=5, round_timeout_s=60,
        evaluate=lambda m: evaluate(m, (test_x, test_y)), on_metrics=events.append,
    )  # fmt: skip
    fed = Federation(server, ps)
    for i, party in enumerate(parties):
        fed.worker(party, lambda c, p=party, s=i: Worker.for_model(
            c, mlp(23, (64, 32), 1), train[p], batch_size=64, lr=0.05, momentum=0.9, seed=s))
    summary = fed.run()
    assert not fed.errors, fed.errors

    final = summary["final_metrics"]["server"]
    assert final["auc"] >= 0.76, summary["evaluations"]
    with torch.no_grad():  # the histogram AUC agrees with the exact one
        exact = binary_auc(ps.model(test_x).squeeze(-1), test_y)
    assert abs(final["auc"] - exact) <= final["auc_max_error"] + 1e-9
    rounds = [e for e in events if e["event"] == "round"]
    assert [r["version"] for r in rounds] == [1, 2, 3, 4, 5]
    assert all(r["contributors"] == sorted(parties) and r["examples"] == 24_000 for r in rounds)
    assert [e["version"] for e in events if e["event"] == "eval"] == [1, 2, 3, 4, 5]


# -- other strategies run end to end ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hyper"),
    [("fedprox", {"mu": 0.1}), ("fedadam", {"lr": 0.05}), ("async-sgd", {"lr": 0.1, "max_staleness": 1})],
)
def test_other_strategies_run_to_the_end(name: str, hyper: dict[str, Any]) -> None:
    initial = tiny_model()
    strategy = make_strategy(name, copy.deepcopy(initial), **hyper)
    total = 8 if name == "async-sgd" else 3
    server = attested_server()
    ps = ParameterServer(server, strategy, workers=["a", "b"], total=total, round_timeout_s=30)
    fed = Federation(server, ps)
    for i, party in enumerate("ab"):
        fed.worker(
            party, lambda c, s=i: Worker.for_model(c, tiny_model(seed=5), blobs(40, seed=s), batch_size=8, lr=0.1)
        )
    summary = fed.run()
    assert not fed.errors, fed.errors
    assert summary["version"] == total
    accepted = sum(w["contributions"] for w in summary["workers"].values())
    assert accepted == (total if name == "async-sgd" else 2 * total)
    assert all(r["done"] for r in fed.results.values())
    moved = [not torch.equal(a, b) for a, b in zip(ps.model.parameters(), initial.parameters(), strict=False)]
    assert all(moved)


@pytest.mark.parametrize(("name", "batches"), [("sync-sgd", 3), ("fedavg", 2 * 5)])
def test_batchnorm_buffers_follow_the_strategy_rules(name: str, batches: int) -> None:
    def bn_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    hyper = {"lr": 0.1, "momentum": 0.0} if name == "sync-sgd" else {}
    strategy = make_strategy(name, bn_model(), **hyper)
    start = strategy.model[1].running_mean.clone()
    server = attested_server()
    ps = ParameterServer(server, strategy, workers=["a", "b"], total=3 if name == "sync-sgd" else 1)
    fed = Federation(server, ps)
    for i, party in enumerate("ab"):
        fed.worker(party, lambda c, s=i: Worker.for_model(c, bn_model(), blobs(40, seed=s), batch_size=8, lr=0.1))
    fed.run()
    assert not fed.errors, fed.errors
    # sync-sgd: one step is one union batch (largest increment); rounds add every worker's.
    assert int(ps.model[1].num_batches_tracked) == batches
    assert not torch.equal(ps.model[1].running_mean, start)


# -- admission: only attested workers of this job ----------------------------------------


def test_worker_with_unknown_measurement_is_refused_and_the_job_goes_on() -> None:
    strategy = make_strategy("fedavg", tiny_model())
    server = attested_server()
    ps = ParameterServer(server, strategy, workers=["a", "b", "evil"], min_workers=2, total=2, round_timeout_s=30)
    fed = Federation(server, ps)
    fed.worker("evil", lambda c: Worker.for_model(c, tiny_model(), blobs(20, seed=9), batch_size=8), measurement=OTHER)
    for i, party in enumerate("ab"):
        fed.worker(party, lambda c, s=i: Worker.for_model(c, tiny_model(), blobs(20, seed=s), batch_size=8))
    summary = fed.run()
    assert set(fed.errors) == {"evil"}
    refusal = fed.errors["evil"]
    assert isinstance(refusal, PeerRefused) and "mr_enclave" in refusal.reason
    assert summary["version"] == 2
    assert summary["workers"]["evil"]["joins"] == 0
    assert summary["workers"]["a"]["contributions"] == summary["workers"]["b"]["contributions"] == 2


def test_party_that_is_not_a_worker_of_the_job_is_refused() -> None:
    strategy = make_strategy("fedavg", tiny_model())
    server = attested_server()
    ParameterServer(server, strategy, workers=["a"], total=1)
    port = server.start()
    try:
        with pytest.raises(PeerRefused) as refused:
            Worker.for_model(client(port, "mallory"), tiny_model(), blobs(8, seed=0), batch_size=4).run()
        assert refused.value.check == "party" and "mallory" in refused.value.reason
    finally:
        server.stop(0)


def test_worker_with_another_model_is_told_what_differs() -> None:
    strategy = make_strategy("fedavg", tiny_model())
    server = attested_server()
    ParameterServer(server, strategy, workers=["a"], total=1)
    port = server.start()
    try:
        with pytest.raises(
            UsageError, match=r"model differs from the server.s: 0.weight is \[9, 6\], the server has \[8, 6\]"
        ):
            Worker.for_model(client(port, "a"), mlp(6, (9,), 3), blobs(8, seed=0), batch_size=4).run()
    finally:
        server.stop(0)


def test_no_quorum_ends_the_run_with_quorum_lost() -> None:
    strategy = make_strategy("fedavg", tiny_model())
    server = attested_server()
    ps = ParameterServer(
        server, strategy, workers=["a", "b"], total=2, round_timeout_s=0.2, quorum_timeout_s=0.3, poll_s=0.2
    )
    fed = Federation(server, ps)
    fed.worker(
        "a", lambda c: Worker.for_model(c, tiny_model(), blobs(8, seed=0), batch_size=4, reconnect_timeout_s=0.5)
    )
    with pytest.raises(QuorumLost, match=r"quorum 2"):
        fed.run()
    assert ps.version == 0


# -- a worker killed mid-run: dropped, the others finish, it rejoins ---------------------


def _worker_process(port: int, party: str, seed: int, conn: Any) -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    worker = Worker.for_model(client(port, party), tiny_model(), blobs(40, seed=seed), batch_size=8, lr=0.1)
    conn.send(worker.run())


def test_killed_worker_is_dropped_and_rejoins_later() -> None:
    rounds: queue.Queue[dict[str, Any]] = queue.Queue()
    gates = {2: threading.Event(), 4: threading.Event()}

    def pace(event: dict[str, Any]) -> None:
        # Workers a and b hold their round-2 and round-4 contributions until released.
        if event["event"] == "train" and event["version"] in gates:
            assert gates[event["version"]].wait(timeout=60)

    strategy = make_strategy("fedavg", tiny_model())
    server = attested_server()
    ps = ParameterServer(
        server, strategy, workers=["a", "b", "c"], min_workers=2, total=6, round_timeout_s=2.0,
        quorum_timeout_s=60, poll_s=1.0, on_metrics=lambda e: rounds.put(e) if e["event"] == "round" else None,
    )  # fmt: skip
    fed = Federation(server, ps)
    for i, party in enumerate("ab"):
        fed.worker(
            party, lambda c, s=i: Worker.for_model(c, tiny_model(), blobs(40, seed=s), batch_size=8, on_metrics=pace)
        )
    summary: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: summary.update(fed.run()), daemon=True)
    runner.start()

    ours, theirs = SPAWN.Pipe()
    first = SPAWN.Process(target=_worker_process, args=(fed.port, "c", 2, theirs), daemon=True)
    first.start()
    _wait_for(lambda: ps.status()["contributors"] == ["c"] and ps.status()["version"] == 2)
    os.kill(first.pid, signal.SIGKILL)  # dies while waiting for round 2 to close
    first.join()
    gates[2].set()
    dropped = _next_round(rounds, lambda r: r["version"] == 4)
    assert dropped["contributors"] == ["a", "b"] and dropped["dropped"] == ["c"]
    assert dropped["closed_by"] == "timeout"

    second = SPAWN.Process(target=_worker_process, args=(fed.port, "c", 2, theirs), daemon=True)
    second.start()
    _wait_for(lambda: "c" in ps.status()["contributors"])
    gates[4].set()
    runner.join(timeout=60)
    assert not fed.errors, fed.errors
    rejoined = ours.recv()
    second.join(timeout=30)

    assert summary["version"] == 6
    assert rejoined["done"] and rejoined["version"] == 6 and rejoined["contributions"] >= 1
    counts = summary["workers"]["c"]
    assert counts["joins"] == 2 and counts["dropped"] == 1
    # Round 4 was open past its deadline: it closed as soon as c and one other had contributed.
    later = _next_round(rounds, lambda r: r["version"] == 5)
    assert "c" in later["contributors"] and len(later["contributors"]) >= 2


def _wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached within the guard time"
        time.sleep(0.02)


def _next_round(rounds: queue.Queue[dict[str, Any]], match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    while True:
        record = rounds.get(timeout=60)
        if match(record):
            return record


# -- after the last round: workers cut off near the end still hear it is done ------------


def test_linger_tells_a_returning_worker_the_run_is_done(caplog: pytest.LogCaptureFixture) -> None:
    strategy = make_strategy("fedavg", tiny_model())
    server = attested_server()
    ps = ParameterServer(server, strategy, workers=["a", "b"], min_workers=1, total=3, round_timeout_s=0.5, poll_s=0.2)
    port = server.start()
    try:
        with pytest.raises(UsageError, match="not done"):
            ps.linger(0.1)
        silent = client(port, "b")  # joins, then its link is "cut": it says nothing more
        assert silent.call(wire.JOIN, Message({"protocol": wire.PROTOCOL})).meta["done"] is False
        fed_a: dict[str, Any] = {}
        a = threading.Thread(
            target=lambda: fed_a.update(
                Worker.for_model(client(port, "a"), tiny_model(), blobs(16, seed=0), batch_size=8).run()
            ),
            daemon=True,
        )
        a.start()
        summary = ps.run()
        a.join(timeout=60)
        assert summary["version"] == 3 and fed_a["done"]
        assert summary["workers"]["b"]["dropped"] >= 1

        with caplog.at_level(logging.INFO, logger="enclavefl.hfl"):
            assert ps.linger(0.2) == ["b"]  # a heard it; b did not call within the grace
        assert "workers ['b'] did not hear that the run is done" in caplog.text

        untold: list[list[str]] = []
        waiting = threading.Thread(target=lambda: untold.append(ps.linger(60)), daemon=True)
        waiting.start()
        reply = silent.call(wire.JOIN, Message({"protocol": wire.PROTOCOL}))  # the link is back
        assert reply.meta["done"] is True and reply.meta["version"] == 3
        waiting.join(timeout=30)  # a hang guard, far above the moment b's reply is sent
        assert untold == [[]]
        silent.close()
    finally:
        server.stop(grace_s=0)


def test_async_run_tells_every_worker_including_late_joiners() -> None:
    """async-sgd: a worker whose upload place is answered "done" and workers that join after
    the last step all get the final state, and linger waits for them (issue 12, item 5)."""
    total = 6
    strategy = make_strategy("async-sgd", tiny_model(), lr=0.1, max_staleness=10)
    server = attested_server()
    ps = ParameterServer(
        server, strategy, workers=["a", "b", "c", "d"], min_workers=1, total=total, round_timeout_s=30, poll_s=0.5
    )
    port = server.start()
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def start(party: str, loss_fn: Callable[..., torch.Tensor] | None = None) -> threading.Thread:
        def body() -> None:
            try:
                extra = {"loss_fn": loss_fn} if loss_fn is not None else {}
                worker = Worker.for_model(
                    client(port, party),
                    tiny_model(),
                    blobs(40, seed=ord(party)),
                    batch_size=8,
                    lr=0.1,
                    reconnect_timeout_s=2.0,
                    **extra,
                )
                results[party] = worker.run()
            except BaseException as exc:  # asserted below
                errors[party] = exc

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return thread

    def after_the_end(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # b's first gradient is ready only once the run is done: its upload place is refused.
        _wait_for(lambda: ps.version >= total)
        return F.cross_entropy(logits, labels)

    try:
        threads = [start("a"), start("b", after_the_end)]
        summary = ps.run()
        assert summary["version"] == total
        threads += [start("c"), start("d")]  # join after the last step
        untold = ps.linger(60)  # a hang guard: returns once every worker has the final state
    finally:
        server.stop(grace_s=1.0)  # as the job does: whoever was not told finds no server
    for thread in threads:
        thread.join(timeout=60)
    assert untold == []
    assert not errors, errors
    assert set(results) == {"a", "b", "c", "d"}
    assert all(r["done"] and r["version"] == total for r in results.values())
    assert results["b"]["contributions"] == 0 and results["b"]["rejoins"] == 0


def test_linger_gives_up_on_a_worker_that_never_joins() -> None:
    strategy = make_strategy("fedavg", tiny_model())
    server = attested_server()
    ps = ParameterServer(server, strategy, workers=["a", "b"], min_workers=1, total=1, round_timeout_s=30)
    fed = Federation(server, ps)
    fed.worker("a", lambda c: Worker.for_model(c, tiny_model(), blobs(16, seed=0), batch_size=8))
    summary = ps.run()
    assert summary["version"] == 1
    assert ps.linger(0.3) == ["b"]  # never joined, so never told
    fed.run = lambda: summary  # type: ignore[method-assign]
    fed._join_workers()
    server.stop(grace_s=0)
    assert not fed.errors, fed.errors


# -- the default quorum: missing workers are named at once ---------------------------------


def test_missing_workers_are_named_at_once_with_the_time_the_server_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = make_strategy("fedavg", tiny_model())
    server = attested_server()
    ps = ParameterServer(server, strategy, workers=["a", "b", "c"], total=2, round_timeout_s=300, poll_s=0.5)
    release = threading.Event()

    def stall(event: dict[str, Any]) -> None:
        # b trains round 2, then goes silent (as if it died) until the test releases it.
        if event["event"] == "train" and event["version"] == 1:
            assert release.wait(timeout=120)

    fed = Federation(server, ps)
    summary: dict[str, Any] = {}
    with caplog.at_level(logging.INFO, logger="enclavefl.hfl"):
        runner = threading.Thread(target=lambda: summary.update(fed.run()), daemon=True)
        runner.start()
        # c never starts: the server says at once whom it waits for and for how long.
        _wait_for(lambda: "waiting for worker(s) ['a', 'b', 'c'] to join" in caplog.text)
        fed.worker("a", lambda c: Worker.for_model(c, tiny_model(), blobs(16, seed=0), batch_size=8))
        fed.worker("b", lambda c: Worker.for_model(c, tiny_model(), blobs(16, seed=1), batch_size=8, on_metrics=stall))
        _wait_for(lambda: "waiting for worker(s) ['c'] to join (2 of 3 joined)" in caplog.text)
        assert "quorum 3 of 3 (strategy.min_workers, default: every worker)" in caplog.text
        assert "the server gives up in 3" in caplog.text  # 300 s round + 3000 s quorum timeout
        assert ps.version == 0
        fed.worker("c", lambda c: Worker.for_model(c, tiny_model(), blobs(16, seed=2), batch_size=8))
        # Round 2: a and c contribute, b is silent: named well before the 300 s round timeout.
        _wait_for(lambda: "round 2: waiting for worker(s) ['b'] (silent for over" in caplog.text)
        assert "it cannot close without them" in caplog.text
        assert ps.version == 1 and "timeout with" not in caplog.text
        release.set()
        runner.join(timeout=60)
    assert summary["version"] == 2 and not fed.errors


# -- the server killed and restarted with resume -----------------------------------------


def _server_process(port: int, directory: str, key_path: str, conn: Any) -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    store = CheckpointStore(directory, key=FileKeySource(Path(key_path)), job_id=JOB, keep_last=10)
    server = attested_server(port)
    ps = ParameterServer(
        server, make_strategy("fedavg", tiny_model(seed=int.from_bytes(os.urandom(2), "little"))),
        workers=["a", "b"], total=8, round_timeout_s=30, checkpoints=store, checkpoint_every=2, resume=True,
        evaluate=lambda m: evaluate(m, blobs(30, seed=99)),
    )  # fmt: skip
    conn.send({"port": server.start(), "resumed_from": ps.status()["resumed_from"],
               "params": {n: p.detach().clone() for n, p in ps.model.named_parameters()}})  # fmt: skip
    conn.send(ps.run())
    server.stop(1.0)


class _KilledAtRound4:
    """A server process with workers a and b, SIGKILLed once both trained round 4 (they wait,
    holding their deltas, until `gate` is set); `restart()` starts a second one on its port."""

    def __init__(self, tmp_path: Path) -> None:
        self.key = create_key_file(tmp_path / "job.key")
        self.directory = tmp_path / "checkpoints"
        self.gate = threading.Event()
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        blocked = threading.Semaphore(0)

        def pace(event: dict[str, Any]) -> None:
            if event["event"] == "train" and event["version"] == 4 and not self.gate.is_set():
                blocked.release()
                assert self.gate.wait(timeout=60)

        def body(party: str, seed: int) -> None:
            worker = Worker.for_model(client(self.port, party), tiny_model(), blobs(40, seed=seed), batch_size=8,
                                      on_metrics=pace, reconnect_timeout_s=60)  # fmt: skip
            try:
                self.results[party] = worker.run()
            except BaseException as exc:  # the test asserts on it
                self.errors[party] = exc

        self.ours, self._theirs = SPAWN.Pipe()
        first = self._start(0)
        self.started = self.ours.recv()
        self.port: int = self.started["port"]
        self.threads = [threading.Thread(target=body, args=(p, i), daemon=True) for i, p in enumerate("ab")]
        for thread in self.threads:
            thread.start()
        assert blocked.acquire(timeout=60) and blocked.acquire(timeout=60)
        os.kill(first.pid, signal.SIGKILL)
        first.join()
        self.store = CheckpointStore(self.directory, key=self.key, job_id=JOB)

    def _start(self, port: int) -> Any:
        process = SPAWN.Process(
            target=_server_process, args=(port, str(self.directory), str(self.key.path), self._theirs), daemon=True
        )
        process.start()
        return process

    def restart(self) -> Any:
        return self._start(self.port)

    def join_workers(self) -> None:
        for thread in self.threads:
            thread.join(timeout=60)


def test_restarted_server_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    run = _KilledAtRound4(tmp_path)
    assert run.started["resumed_from"] is None
    assert run.store.versions() == [2, 4]
    saved = run.store.load(4)
    second = run.restart()
    resumed = run.ours.recv()
    run.gate.set()
    summary = run.ours.recv()
    run.join_workers()
    second.join(timeout=30)

    assert resumed["resumed_from"] == 4
    for name, value in resumed["params"].items():
        assert torch.equal(value, saved["strategy"]["strategy"]["model"][name]), name
    assert summary["resumed_from"] == 4 and summary["version"] == 8
    assert summary["rollback_protection"] == "peer-based"  # a file: key, no broker
    # Nothing before the checkpoint is lost: evaluations 1-4 come from the first server.
    assert [e["version"] for e in summary["evaluations"]] == list(range(1, 9))
    assert summary["evaluations"][:4] == saved["evaluations"]
    assert not run.errors
    assert all(r["done"] and r["version"] == 8 and r["rejoins"] >= 1 for r in run.results.values())
    assert run.store.versions() == [2, 4, 6, 8]


def test_workers_refuse_a_server_resumed_from_older_state_than_it_had_sealed(tmp_path: Path) -> None:
    """Without a key broker: the host deleted the newest checkpoint, the server resumed from
    the one before; the workers were told version 4 was sealed and refuse (issue 12, item 3)."""
    run = _KilledAtRound4(tmp_path)
    assert run.store.versions() == [2, 4]
    run.store.path(4).unlink()  # the host deletes the newest checkpoint

    second = run.restart()
    try:
        assert run.ours.recv()["resumed_from"] == 2
        run.gate.set()
        run.join_workers()
    finally:
        second.kill()
        second.join()
    assert set(run.errors) == {"a", "b"}
    for error in run.errors.values():
        assert isinstance(error, Rejected) and error.check == "freshness"
        assert "came back at version 2, but it had sealed a checkpoint of version 4" in error.reason
        assert "peer-based rollback protection" in error.reason


def test_resume_refuses_a_tampered_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path, key=create_key_file(tmp_path / "k"), job_id=JOB)
    strategy = make_strategy("fedavg", tiny_model())
    for version in (1, 2):
        strategy.version = version
        store.save(version, {"format": 1, "strategy": strategy.state_dict(), "rng": {}, "evaluations": []})
    path = store.path(2)
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SealError) as refused:
        ParameterServer(attested_server(), make_strategy("fedavg", tiny_model()), workers=["a"], total=3,
                        checkpoints=store, resume=True)  # fmt: skip
    assert refused.value.check == "integrity"
    assert "refusing to resume" in caplog.text and "not falling back" in caplog.text


# -- DLRM: only the rows a batch touches travel -------------------------------------------


def _dlrm() -> DLRM:
    torch.manual_seed(3)
    return DLRM([500, 600, 700], num_dense=4, num_sparse=3, embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8, 1),
                sparse=True)  # fmt: skip


def _clicks(rows: int, low: int, high: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, 4, generator=g)
    sparse = torch.randint(low, high, (rows, 3), generator=g)
    return dense, sparse, torch.randint(0, 2, (rows,), generator=g)


def test_dlrm_sends_only_the_rows_each_batch_touches() -> None:
    steps, batch = 4, 8
    data = {"a": _clicks(batch * steps, 0, 10, seed=1), "b": _clicks(batch * steps, 20, 30, seed=2)}
    held_out = _clicks(24, 5, 45, seed=3)
    initial = _dlrm()
    strategy = make_strategy("sync-sgd", copy.deepcopy(initial), lr=0.5, momentum=0.0)
    server = attested_server()
    ps = ParameterServer(server, strategy, workers=["a", "b"], total=steps, round_timeout_s=30, eval_every=2)
    fed = Federation(server, ps)
    workers: dict[str, Worker] = {}

    def dlrm_rows(inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"embeddings.{i}.weight": inputs[1][:, i] for i in range(3)}

    def build(c: AttestedClient, party: str) -> Worker:
        # Worker a discovers its rows by running the model, worker b names them.
        workers[party] = Worker.for_model(c, _dlrm(), data[party], batch_size=batch, shuffle=False,
                                rows_of=dlrm_rows if party == "b" else None,
                                eval_data=held_out if party == "a" else None)  # fmt: skip
        return workers[party]

    for party in data:
        fed.worker(party, lambda c, p=party: build(c, p))
    summary = fed.run()
    assert not fed.errors, fed.errors
    assert summary["version"] == steps

    table_bytes = sum(t.weight.numel() * 4 for t in initial.embeddings)
    layout = wire.Layout(initial)
    dense_bytes = layout.num_dense * 4 + layout.num_ints * 8
    for party, (_, sparse, _) in data.items():
        pushes = list(workers[party].traffic)
        assert len(pushes) == steps
        for step, record in enumerate(pushes):
            sent = sparse[step * batch : (step + 1) * batch]
            following = sparse[((step + 1) % steps) * batch : ((step + 1) % steps + 1) * batch]
            for i in range(3):
                name = f"embeddings.{i}.weight"
                assert record["rows_sent"][name] == sent[:, i].unique().numel()
                assert record["rows_received"][name] == following[:, i].unique().numel()
            rows = sum(following[:, i].unique().numel() * (8 + 4 * 4) for i in range(3))
            assert record["bytes_received"] == dense_bytes + rows < table_bytes / 10
    # Rows no worker touched are exactly as initialized; touched rows moved.
    for i, (got, start) in enumerate(zip(ps.model.embeddings, initial.embeddings, strict=False)):
        touched = torch.cat([data[p][1][:, i] for p in data]).unique()
        untouched = torch.ones(start.weight.shape[0], dtype=torch.bool)
        untouched[touched] = False
        assert torch.equal(got.weight[untouched], start.weight[untouched])
        assert not torch.equal(got.weight[touched], start.weight[touched])
    # Worker a pulled the rows of its held-out data before evaluating: its final
    # evaluation is that of the server's model.
    final = workers["a"].evaluations[-1]
    expected = evaluate(ps.model, held_out).summary()
    assert final["version"] == steps
    assert final["log_loss"] == pytest.approx(expected["log_loss"], rel=1e-6)


# -- the upload gate bounds payloads in memory ------------------------------------------


def test_upload_gate_holds_one_payload_at_a_time_and_frees_places() -> None:
    gate = UploadGate(1, gated=wire.PAYLOAD)
    spec = TensorSpec(wire.PAYLOAD, "float32", (4,), "torch")
    first = gate.open(spec)
    first.write(bytes(16))
    payload = first.close()
    opened: list[Any] = []
    waiting = threading.Thread(target=lambda: opened.append(gate.open(spec)), daemon=True)
    waiting.start()
    waiting.join(timeout=0.3)
    assert waiting.is_alive() and not opened  # the second upload waits for the place
    payload.release()
    waiting.join(timeout=10)
    assert len(opened) == 1
    opened[0].abort()  # an aborted upload gives its place back
    third = gate.open(spec)
    third.write(bytes(16))
    dropped = third.close()
    del dropped  # a payload no handler saw gives its place back when freed
    gc.collect()
    fourth: list[Any] = []
    taker = threading.Thread(target=lambda: fourth.append(gate.open(spec)), daemon=True)
    taker.start()
    taker.join(timeout=10)
    assert len(fourth) == 1
    # Other tensors of a push never wait.
    assert gate.open(TensorSpec("ints", "int64", (2,), "torch")) is not None


# -- the wire layout refuses malformed contributions --------------------------------------


def test_layout_refuses_malformed_contributions() -> None:
    model = _dlrm()
    layout = wire.Layout(model)
    model.zero_grad()
    _, sparse, _ = _clicks(4, 0, 10, seed=1)
    F.binary_cross_entropy_with_logits(model(torch.randn(4, 4), sparse).squeeze(-1), torch.ones(4)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    contribution = grad_contribution(model, {}, worker="a", batch_size=4, version=0)
    tensors = layout.pack_contribution(contribution)
    payload = tensors.pop(wire.PAYLOAD)
    unpacked = layout.unpack_contribution(tensors, payload)
    rebuilt = layout.contribution(unpacked, kind=GradContribution, worker="a", weight=4, version=0)
    assert set(rebuilt.grads) == set(grads)
    torch.testing.assert_close(rebuilt.grads["top.0.weight"], grads["top.0.weight"])
    assert torch.equal(rebuilt.grads["embeddings.0.weight"].to_dense(), grads["embeddings.0.weight"].to_dense())

    with pytest.raises(UsageError, match="payload: expected torch.float32"):
        layout.unpack_contribution(tensors, payload[:-1])
    with pytest.raises(UsageError, match="NaN or infinite"):
        layout.unpack_contribution(tensors, torch.full_like(payload, float("nan")))
    index = tensors["index/embeddings.0.weight"].clone()
    index[0] = 500
    bad_index = {**tensors, "index/embeddings.0.weight": index}
    with pytest.raises(UsageError, match=r"rows outside \[0, 500\)"):
        layout.unpack_contribution(bad_index, payload)
    with pytest.raises(UsageError, match="missing"):
        layout.unpack_contribution({k: v for k, v in tensors.items() if k != wire.INTS}, payload)
