"""Record-level DP-SGD in horizontal workers over the attested channel: the budget stops the run."""

from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import sim_credentials, sim_measurement, sim_policy
import torch

from enclavefl.errors import Rejected
from enclavefl.hfl import wire
from enclavefl.hfl.checkpoint import CheckpointStore
from enclavefl.hfl.server import ParameterServer
from enclavefl.hfl.registry import make_strategy
from enclavefl.hfl.worker import Worker, builtin_trainer
from enclavefl.models import mlp
from enclavefl.net.admission import PartyCredentials
from enclavefl.net.client import AttestedClient, RetryPolicy
from enclavefl.net.errors import PeerRefused
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import Message
from enclavefl.seal.keys import FileKeySource, create_key_file

if TYPE_CHECKING:
    from enclavefl.privacy.dpsgd import DpSgd

# Opacus (the [dp] extra) is checked here without importing it (seconds at collection):
# enclavefl.privacy.dpsgd imports it, in the test that uses it.
if importlib.util.find_spec("opacus") is None:
    pytest.skip("the [dp] extra (opacus) is not installed", allow_module_level=True)

GOOD = sim_measurement(b"dp enclave", b"dp signer")
POLICY = sim_policy(GOOD, privacy={"unit": "record", "max_epsilon": 1.0, "delta": 1e-5})
JOB = "dp-test"


@functools.cache
def credentials(party: str) -> PartyCredentials:
    # One identity per party name: the server holds a name for the key that used it last.
    return sim_credentials(party, GOOD, POLICY, JOB)


def client(port: int, party: str) -> AttestedClient:
    return AttestedClient(f"127.0.0.1:{port}", credentials(party),
                          retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05))


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).float()


@pytest.mark.usefixtures("one_torch_thread")  # parties share the cores in this process
def test_workers_stop_at_the_budget_and_the_server_seals_its_last_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt", key=FileKeySource(create_key_file(tmp_path / "k").path), job_id=JOB)
    torch.manual_seed(0)
    server = AttestedServer(credentials("server"), port=0, max_workers=8)
    ps = ParameterServer(server, make_strategy("fedavg", mlp(6, (8,), 1)), workers=["a", "b"], total=6,
                         min_workers=1, checkpoints=store, round_timeout_s=60)
    port = server.start()
    from enclavefl.privacy.dpsgd import DpSgd

    results: dict[str, Any] = {}
    spent: dict[str, DpSgd] = {}
    events: list[dict[str, Any]] = []

    def body(party: str, seed: int) -> None:
        torch.manual_seed(0)
        model = mlp(6, (8,), 1)
        train = data(seed)
        # Planned for 2 rounds of 4 steps at epsilon 1; the server plans 6 rounds.
        dp = DpSgd(model, train, batch_size=64, delta=1e-5, planned_steps=8, max_grad_norm=1.0,
                   target_epsilon=1.0, max_epsilon=1.0, seed=seed)
        spent[party] = dp
        trainer = builtin_trainer(model, train, batch_size=64, lr=0.5, privacy=dp)
        worker = Worker(client(port, party), trainer, on_metrics=events.append)
        results[party] = worker.run()

    threads = [threading.Thread(target=body, args=(p, i), daemon=True) for i, p in enumerate("ab")]
    for thread in threads:
        thread.start()
    try:
        summary = ps.run()
    finally:
        for thread in threads:
            thread.join(timeout=120)
    assert summary["stopped"] == "privacy budget"
    assert summary["version"] == 2 and summary["left"] == {"a": "privacy budget", "b": "privacy budget"}
    for party in "ab":
        assert results[party]["stopped"] == "privacy budget"
        assert spent[party].report()["dp_steps"] == 8
        assert spent[party].epsilon <= 1.0
    trained = [e for e in events if e["event"] == "train"]
    assert len(trained) == 4 and all(e["dp_accountant"] == "rdp" and e["dp_epsilon"] <= 1.0 for e in trained)
    assert [e["reason"] for e in events if e["event"] == "stopped"] == ["privacy budget"] * 2
    # The last state is sealed: it loads (authenticated) and is the version the run stopped at.
    latest = store.load_latest()
    assert latest is not None and latest[0] == 2
    # A worker that left may not come back (a restart would reset its accountant).
    with client(port, "a") as again, pytest.raises((Rejected, PeerRefused), match="left this run") as refused:
        again.call(wire.JOIN, Message({"protocol": wire.PROTOCOL, "evaluates": False}))
    assert refused.value.check == "privacy"
    server.stop(grace_s=0)
