"""Shared fixtures: where the shared test data lives, a pinned verification clock, the sample
quotes, a key file, and simulated parties (measurement, policy, credentials)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest

from enclavefl.net.admission import Mode, PartyCredentials
from enclavefl.seal.keys import FileKeySource, create_key_file
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.collateral import OfflineCollateral
from enclavefl.tee.measure import Measurement
from enclavefl.tee.policy import Policy

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ENCLAVEFL_SHARED_DATA", REPO.parent / "shared" / "data"))

# Both sample quotes verify offline at this unix time (their collateral is valid then).
PINNED_TIME = 1751328000


def shared_file(*parts: str) -> Path:
    """Path of a file in ../shared/data; when absent, skips (fails under CI=true) with a clear message."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        missing_shared_data(path)
    return path


def missing_shared_data(path: Path) -> None:
    """Skip a test whose shared data is absent; under CI=true fail instead, so a green CI means it ran."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"shared test data not found at {path}: CI must run with ../shared beside the clone")
    pytest.skip(f"shared test data not found at {path} (clone with ../shared beside the repo)")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test: parties started in one process do not oversubscribe the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def attestation_dir() -> Path:
    return shared_file("attestation")


@pytest.fixture
def tabular_dir() -> Path:
    return shared_file("tabular")


@pytest.fixture
def sgx_quote(attestation_dir: Path) -> bytes:
    return (attestation_dir / "sgx_quote").read_bytes()


@pytest.fixture
def tdx_quote(attestation_dir: Path) -> bytes:
    return (attestation_dir / "tdx_quote").read_bytes()


@pytest.fixture(scope="module")
def sgx_sample() -> tuple[bytes, OfflineCollateral]:
    """The SGX sample quote and its offline collateral (verifies at PINNED_TIME)."""
    return (
        shared_file("attestation", "sgx_quote").read_bytes(),
        OfflineCollateral(shared_file("attestation", "sgx_quote_collateral.json")),
    )


@pytest.fixture
def key(tmp_path: Path) -> FileKeySource:
    """A fresh key file (the insecure `file:` key source) in the test's directory."""
    return create_key_file(tmp_path / "kek.hex")


def hfl_demo_job(
    directory: Path, *, rounds: int | None = None, policy: dict[str, Any] | None = None, **sections: Any
) -> Path:
    """The `enclavefl demo` hfl job (digits: a server, two workers) written in `directory` with
    its simulated policy (or `policy`), `rounds` rounds, and `sections` set at the top level."""
    import json

    import yaml

    from enclavefl.jobs.demo import SIMULATED_POLICY, write_hfl_demo

    (directory / "policy.json").write_text(json.dumps(SIMULATED_POLICY if policy is None else policy))
    job_file = write_hfl_demo(directory)
    job = yaml.safe_load(job_file.read_text())
    if rounds is not None:
        job["strategy"]["rounds"] = rounds
    job.update(sections)
    job_file.write_text(yaml.safe_dump(job))
    return job_file


# --- simulated parties ------------------------------------------------------------------


def sim_measurement(enclave: bytes, signer: bytes = b"signer") -> Measurement:
    """A measurement for simulated evidence: mr_enclave and mr_signer are SHA-256 of the names."""
    return Measurement(hashlib.sha256(enclave).digest(), hashlib.sha256(signer).digest())


def sim_policy(measurement: Measurement, **values: Any) -> Policy:
    """A policy that pins `measurement`'s mr_enclave and accepts simulated evidence."""
    return Policy.from_values(mr_enclave=measurement.mr_enclave, allow_simulated=True, **values)


def sim_credentials(
    party: str, measurement: Measurement, policy: Policy, job_id: str, mode: Mode | str = Mode.TWO_WAY
) -> PartyCredentials:
    """Credentials of a simulated party that runs `measurement` and enforces `policy`."""
    return PartyCredentials.create(SimulatedAttester(measurement), policy, party=party, job_id=job_id, mode=mode)


# Fuzz budgets: each property test names its default number of examples (small, so that
# `make test` stays fast); `make fuzz` multiplies them by ENCLAVEFL_FUZZ_SCALE.
FUZZ_SCALE = max(1, int(os.environ.get("ENCLAVEFL_FUZZ_SCALE", "1")))


def fuzz_settings(examples: int) -> Any:
    """hypothesis settings for a fuzz test with `examples` examples at the default scale."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=examples * FUZZ_SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# End-to-end modules: they start parties (subprocesses, or servers and clients talking over real
# gRPC), build wheels or run whole jobs. Marked `integration` so that `make test-unit` (-m "not
# integration and not slow") gives feedback in well under a minute; `make test` runs them all.
INTEGRATION_MODULES = frozenset({
    "test_api_examples.py",
    "test_cli_net.py",
    "test_deploy_docker.py",
    "test_examples.py",
    "test_hfl_roles.py",
    "test_jobs_run.py",
    "test_jobs_vfl.py",
    "test_keras.py",
    "test_multihost_netns.py",
    "test_net_bigtensor.py",
    "test_privacy_examples.py",
    "test_privacy_hfl.py",
    "test_run_report.py",
    "test_train_sgd.py",
    "test_vfl.py",
    "test_wheel.py",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
