"""The privacy budget in the policy: parsing, digest, CLI, and peers that disagree on it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import sim_measurement, sim_policy
from click.testing import CliRunner

from enclavefl.cli import main
from enclavefl.errors import ConfigError, PolicyRejected
from enclavefl.net.admission import Mode, PartyCredentials, check_policy_hash, make_identity
from enclavefl.net.client import AttestedClient, RetryPolicy
from enclavefl.net.errors import PeerRefused
from enclavefl.net.server import AttestedServer
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.policy import Policy
from enclavefl.tee.ratls import verify_certificate

GOOD = sim_measurement(b"good enclave")
RECORD_3 = {"unit": "record", "max_epsilon": 3, "delta": 1e-5}


def policy(privacy: dict[str, Any] | None) -> Policy:
    return sim_policy(GOOD, privacy=privacy)


def test_budget_is_part_of_the_digest_and_round_trips(tmp_path: Path) -> None:
    plain, record = policy(None), policy(RECORD_3)
    assert "privacy" not in plain.canonical()
    assert record.canonical()["privacy"] == {"unit": "record", "max_epsilon": 3.0, "delta": 1e-5}
    digests = {
        plain.digest(),
        record.digest(),
        policy({**RECORD_3, "max_epsilon": 3.5}).digest(),
        policy({**RECORD_3, "delta": 1e-6}).digest(),
        policy({**RECORD_3, "unit": "worker"}).digest(),
    }
    assert len(digests) == 5
    # 3 and 3.0 mean the same budget.
    assert policy({**RECORD_3, "max_epsilon": 3.0}).digest() == record.digest()
    record.save(tmp_path / "p.json")
    loaded = Policy.load(tmp_path / "p.json")
    assert loaded == record and loaded.digest() == record.digest()
    assert loaded.privacy is not None and loaded.privacy.describe() == "record-level epsilon <= 3, delta = 1e-05"


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({**RECORD_3, "max_epsilon": 0}, "privacy.max_epsilon: must be a finite number > 0"),
        ({**RECORD_3, "max_epsilon": float("inf")}, "privacy.max_epsilon: must be a finite number > 0"),
        ({**RECORD_3, "delta": 1.0}, r"privacy.delta: must be within \[0, 1\)"),
        ({**RECORD_3, "delta": 0}, "delta must be > 0 for unit record"),
        ({**RECORD_3, "unit": "row"}, "privacy.unit"),
        ({**RECORD_3, "epsilon": 1}, "unknown key 'epsilon' in privacy"),
        ({"unit": "record", "delta": 1e-5}, "privacy.max_epsilon"),
    ],
)
def test_bad_budgets_name_the_field(privacy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Policy.from_json({"allow_simulated": True, "privacy": privacy})


def test_label_budget_may_be_pure() -> None:
    label = Policy.from_json({"privacy": {"unit": "label", "max_epsilon": 2, "delta": 0}})
    assert label.privacy is not None and label.privacy.delta == 0.0


def test_policy_init_writes_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = CliRunner().invoke(main, ["policy", "init", "--out", str(out), "--mr-enclave", GOOD.mr_enclave.hex(),
                                       "--max-epsilon", "3", "--delta", "1e-5", "--privacy-unit", "record"])
    assert result.exit_code == 0, result.output
    assert "record-level epsilon <= 3" in result.output
    assert json.loads(out.read_text())["privacy"] == {"unit": "record", "max_epsilon": 3.0, "delta": 1e-5}
    assert Policy.load(out).digest() == Policy.from_values(
        mr_enclave=GOOD.mr_enclave, privacy=RECORD_3
    ).digest()
    half = CliRunner().invoke(main, ["policy", "init", "--out", str(tmp_path / "q.json"),
                                     "--mr-enclave", GOOD.mr_enclave.hex(), "--max-epsilon", "3"])
    assert half.exit_code == 2
    assert "missing --delta, --privacy-unit" in half.output


@pytest.mark.parametrize(
    ("mine", "theirs", "text"),
    [
        (RECORD_3, {**RECORD_3, "max_epsilon": 8}, "party peer enforces record-level epsilon <= 8"),
        (RECORD_3, None, "party peer enforces no privacy budget, this party enforces record-level epsilon <= 3"),
        (None, RECORD_3, "this party enforces no privacy budget"),
    ],
)
def test_peer_with_another_budget_is_refused_naming_privacy(
    mine: dict[str, Any] | None, theirs: dict[str, Any] | None, text: str
) -> None:
    cert = make_identity(SimulatedAttester(GOOD), policy(theirs)).cert_der
    claims = verify_certificate(cert, policy=policy(mine))
    with pytest.raises(PolicyRejected, match="privacy budget mismatch") as info:
        check_policy_hash(claims, policy(mine), "party peer")
    assert info.value.check == "privacy"
    assert text in info.value.reason


def test_same_budget_other_policy_difference_is_a_hash_mismatch() -> None:
    cert = make_identity(SimulatedAttester(GOOD), policy(RECORD_3)).cert_der
    looser = sim_policy(GOOD, allow_debug=True, privacy=RECORD_3)
    claims = verify_certificate(cert, policy=looser)
    with pytest.raises(PolicyRejected, match="policy hash mismatch") as info:
        check_policy_hash(claims, looser, "party peer")
    assert info.value.check == "policy-hash"


@pytest.fixture
def server() -> Iterator[AttestedServer]:
    mine = policy(RECORD_3)
    identity = make_identity(SimulatedAttester(GOOD), mine, party="server")
    credentials = PartyCredentials(identity, mine, "server", "job-1")
    server = AttestedServer(credentials, port=0)
    server.start()
    yield server
    server.stop(0)


def client(port: int, privacy: dict[str, Any], mode: str) -> AttestedClient:
    theirs = policy(privacy)
    credentials = PartyCredentials(
        make_identity(SimulatedAttester(GOOD), theirs, party="w"), theirs, "w", "job-1", Mode(mode)
    )
    return AttestedClient(f"127.0.0.1:{port}", credentials, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01))


def test_both_ends_of_the_channel_refuse_another_budget(server: AttestedServer) -> None:
    looser = {**RECORD_3, "max_epsilon": 10}
    with client(server.port, looser, "two-way") as c:  # the client checks the server first
        with pytest.raises(PolicyRejected, match="privacy budget mismatch") as info:
            c.connect()
    assert info.value.check == "privacy"
    with client(server.port, looser, "client") as c:  # only the server checks
        with pytest.raises(PeerRefused, match="privacy budget mismatch") as refused:
            c.connect()
    assert refused.value.check == "privacy"
