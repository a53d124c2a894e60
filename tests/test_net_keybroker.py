"""The key broker: keys only to peers its policy admits, used as KEK for sealed files."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import sim_credentials, sim_measurement

from enclavefl.errors import ConfigError, SealError, UsageError
from enclavefl.net.admission import PartyCredentials
from enclavefl.net.errors import PeerRefused
from enclavefl.net.keybroker import (
    BrokerKeySource,
    configure_broker_access,
    create_broker_key,
    serve_key_broker,
)
from enclavefl.net.server import AttestedServer
from enclavefl.seal.keys import FileKeySource, create_key_file, parse_key_spec
from enclavefl.seal.sealed import seal_file, unseal_file
from enclavefl.tee.measure import Measurement
from enclavefl.tee.policy import Policy

TRUSTED = sim_measurement(b"fl party")
UNTRUSTED = sim_measurement(b"tampered party")
POLICY = Policy.from_values(mr_signer=TRUSTED.mr_signer, mr_enclave=TRUSTED.mr_enclave, allow_simulated=True)
JOB = "job-broker"


def access(measurement: Measurement, party: str) -> PartyCredentials:
    return sim_credentials(party, measurement, POLICY, JOB)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    directory.mkdir()
    create_broker_key(directory, "model-key")
    return directory


@pytest.fixture
def broker(keys_dir: Path) -> Iterator[AttestedServer]:
    server = serve_key_broker(keys_dir, access(TRUSTED, "keybroker"))
    yield server
    server.stop(0)


@pytest.fixture
def configured() -> Iterator[None]:
    yield
    configure_broker_access(None)


def test_policy_satisfying_peer_gets_the_key_and_unseals(
    broker: AttestedServer, keys_dir: Path, tmp_path: Path, configured: None, caplog: pytest.LogCaptureFixture
) -> None:
    configure_broker_access(access(TRUSTED, "worker-1"))
    key = parse_key_spec(f"broker:127.0.0.1:{broker.port}/model-key")
    assert key.spec == f"broker:127.0.0.1:{broker.port}/model-key"
    with caplog.at_level(logging.INFO, logger="enclavefl.net"):
        kek = key.kek()
    assert kek == FileKeySource(keys_dir / "model-key").kek()
    assert "released key model-key to party worker-1" in caplog.text
    assert kek.hex() not in caplog.text

    plain, sealed, back = tmp_path / "model.bin", tmp_path / "model.sealed", tmp_path / "model.out"
    plain.write_bytes(b"weights" * 1000)
    seal_file(plain, sealed, key=key, job_id=JOB, name="model", version=1)
    unseal_file(sealed, back, key=key, job_id=JOB, name="model", version=1)
    assert back.read_bytes() == plain.read_bytes()


def test_other_peer_is_refused_and_the_broker_goes_on(broker: AttestedServer, keys_dir: Path, tmp_path: Path) -> None:
    target = f"127.0.0.1:{broker.port}"
    with pytest.raises(PeerRefused, match="mr_enclave mismatch") as info:
        BrokerKeySource(target, "model-key", access(UNTRUSTED, "intruder")).kek()
    assert info.value.check == "mr_enclave"

    trusted = BrokerKeySource(target, "model-key", access(TRUSTED, "worker-2"))
    plain, sealed, back = tmp_path / "data.bin", tmp_path / "data.sealed", tmp_path / "data.out"
    plain.write_bytes(b"ids" * 100)
    seal_file(plain, sealed, key=trusted, job_id=JOB, name="ids", version=3)
    # The key the broker holds is the one that opens it; a different key does not.
    unseal_file(sealed, back, key=FileKeySource(keys_dir / "model-key"), job_id=JOB, name="ids", version=3)
    assert back.read_bytes() == plain.read_bytes()
    create_broker_key(keys_dir, "other-key")
    with pytest.raises(SealError):
        unseal_file(sealed, back, key=BrokerKeySource(target, "other-key", access(TRUSTED, "w")), job_id=JOB,
                    name="ids", version=3)  # fmt: skip


def test_unknown_key_name_is_refused(broker: AttestedServer) -> None:
    source = BrokerKeySource(f"127.0.0.1:{broker.port}", "missing", access(TRUSTED, "worker"))
    with pytest.raises(PeerRefused, match="key 'missing' is not held") as info:
        source.kek()
    assert info.value.check == "key-name"


def test_broker_spec_needs_configuration_and_a_valid_form(configured: None) -> None:
    with pytest.raises(ConfigError, match="configure_broker_access"):
        parse_key_spec("broker:127.0.0.1:7000/key")
    configure_broker_access(access(TRUSTED, "worker"))
    for bad in ("broker:127.0.0.1:7000", "broker:nohost/key", "broker:127.0.0.1:7000/../etc"):
        with pytest.raises(ConfigError):
            parse_key_spec(bad)


def test_broker_setup_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        serve_key_broker(tmp_path / "nope", access(TRUSTED, "keybroker"))
    lax = sim_credentials("keybroker", TRUSTED, POLICY, JOB, mode="server")
    with pytest.raises(UsageError, match="must attest its clients"):
        serve_key_broker(tmp_path, lax)
    with pytest.raises(UsageError, match="key name"):
        create_broker_key(tmp_path, "../escape")


def test_broker_keys_do_not_carry_the_file_key_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        path = create_broker_key(tmp_path, "fresh")
        create_key_file(tmp_path / "dev.key")
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(FileKeySource(path).kek()) == 32
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"created key file {tmp_path / 'dev.key'}: file: keys are insecure, for development only"]
    assert any("created broker key 'fresh'" in r.getMessage() for r in caplog.records)
    with pytest.raises(UsageError, match="already exists"):
        create_broker_key(tmp_path, "fresh")


# -- the version register: rollback by deletion (issue 12, item 3) -----------------------


def test_broker_version_register_is_monotonic_per_party_and_survives_a_restart(
    broker: AttestedServer, keys_dir: Path
) -> None:
    from enclavefl.errors import Rejected
    from enclavefl.net.keybroker import BrokerKeySource

    target = f"127.0.0.1:{broker.port}"
    server_versions = BrokerKeySource(target, "model-key", access(TRUSTED, "server")).versions()
    other_versions = BrokerKeySource(target, "model-key", access(TRUSTED, "worker-1")).versions()
    assert server_versions.recorded("hfl-server-checkpoint") is None
    server_versions.record("hfl-server-checkpoint", 3)
    server_versions.record("hfl-server-checkpoint", 5)
    server_versions.record("hfl-server-checkpoint", 5)  # the same version again: fine
    with pytest.raises(Rejected, match="version 4 is older than version 5 this key broker recorded") as caught:
        server_versions.record("hfl-server-checkpoint", 4)
    assert caught.value.check == "freshness"
    assert server_versions.recorded("hfl-server-checkpoint") == 5
    assert other_versions.recorded("hfl-server-checkpoint") is None  # each party has its own entries
    broker.stop(0)
    restarted = serve_key_broker(keys_dir, access(TRUSTED, "keybroker"))
    try:
        again = BrokerKeySource(f"127.0.0.1:{restarted.port}", "model-key", access(TRUSTED, "server")).versions()
        assert again.recorded("hfl-server-checkpoint") == 5
    finally:
        restarted.stop(0)


def test_checkpoints_deleted_on_the_host_are_not_resumed_from_silently(
    broker: AttestedServer, tmp_path: Path
) -> None:
    from enclavefl.errors import Rejected
    from enclavefl.hfl.checkpoint import CheckpointStore
    from enclavefl.net.keybroker import BrokerKeySource

    source = BrokerKeySource(f"127.0.0.1:{broker.port}", "model-key", access(TRUSTED, "server"))
    store = CheckpointStore(tmp_path / "ckpt", key=source, job_id=JOB, keep_last=3, freshness=source.versions())
    for version in range(1, 5):
        store.save(version, {"version": version})
    assert store.load_latest() == (4, {"version": 4})
    store.path(4).unlink()
    store.path(3).unlink()
    with pytest.raises(Rejected, match=r"newest checkpoint in .* is version 2, but version 4 was sealed and recorded "
                                       r"with key broker 127\.0\.0\.1:\d+") as caught:
        store.load_latest()
    assert caught.value.check == "freshness"
    store.path(2).unlink()
    with pytest.raises(Rejected, match="there is no checkpoint in .*, but version 4 was sealed"):
        store.load_latest()
    with pytest.raises(Rejected, match="version 1 is older than version 4"):
        store.save(1, {"version": 1})  # a fresh run under the same job id would roll back too
