"""Kubernetes manifests: valid against the Kubernetes schemas (offline), one Job per party of a
valid job, data read-only, checkpoints on claims, readiness instead of sleeps, SGX resources."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclavefl.jobs.config import JobConfig, load_job

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
SIM = {"hfl": K8S / "hfl.yaml", "vfl": K8S / "vfl.yaml"}
SGX = K8S / "hfl-sgx.yaml"
ALL = [*SIM.values(), SGX]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def jobs_by_party(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["labels"]["enclavefl.io/party"]: d for d in of_kind(docs, "Job")}


def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def party_container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod(job)["containers"] if c["name"] == "party"]
    return container


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def volume(job: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in pod(job)["volumes"] if v["name"] == name]
    return found


def configmap_job(path: Path, tmp_path: Path) -> JobConfig:
    """The job in the manifest's ConfigMap, loaded as a party would from /etc/enclavefl."""
    (configmap,) = of_kind(documents(path), "ConfigMap")
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    return load_job(tmp_path / "job.yaml")


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_manifests_validate_against_kubernetes_schemas(path: Path) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (bundles the schemas) not installed")
    for doc in documents(path):
        kv.validate(doc, kv.latest_version(), strict=True)


def test_schema_validation_catches_mistakes() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (bundles the schemas) not installed")
    job = of_kind(documents(SIM["hfl"]), "Job")[0]
    typo = copy.deepcopy(job)
    party_container(typo)["volumeMount"] = party_container(typo).pop("volumeMounts")
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["backoffLimit"] = "four"
    for bad in (typo, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, kv.latest_version(), strict=True)


@pytest.mark.parametrize("mode", ["hfl", "vfl"])
def test_one_job_per_party_of_the_configmap_job(mode: str, tmp_path: Path) -> None:
    docs = documents(SIM[mode])
    job = configmap_job(SIM[mode], tmp_path)
    assert job.mode == mode
    parties = jobs_by_party(docs)
    assert sorted(parties) == sorted(p.name for p in job.parties)
    (configmap,) = of_kind(docs, "ConfigMap")
    for name, k8s_job in parties.items():
        container = party_container(k8s_job)
        # A restarted Job resumes from the party's sealed checkpoints (none at first: fresh start).
        assert container["args"] == ["party", "/etc/enclavefl/job.yaml", "--name", name, "--resume"]
        assert job.storage is not None
        assert mounts(container)["/etc/enclavefl"]["readOnly"] is True
        assert volume(k8s_job, "job")["configMap"]["name"] == configmap["metadata"]["name"]
        assert pod(k8s_job)["restartPolicy"] == "OnFailure"


@pytest.mark.parametrize("mode", ["hfl", "vfl"])
def test_coordinator_service_and_readiness_members_wait(mode: str, tmp_path: Path) -> None:
    docs = documents(SIM[mode])
    job = configmap_job(SIM[mode], tmp_path)
    coordinator = job.coordinator()
    (service,) = of_kind(docs, "Service")
    assert service["metadata"]["name"] == coordinator.address.host
    assert service["spec"]["ports"][0]["port"] == coordinator.address.port
    parties = jobs_by_party(docs)
    labels = parties[coordinator.name]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    probe = party_container(parties[coordinator.name])["readinessProbe"]["exec"]["command"]
    assert probe == ["enclavefl", "health", f"127.0.0.1:{coordinator.address.port}"]
    for member in job.members():
        (init,) = pod(parties[member.name])["initContainers"]
        assert init["args"][:2] == ["health", str(coordinator.address)] and "--wait" in init["args"]
    for k8s_job in parties.values():
        for container in [*pod(k8s_job)["containers"], *pod(k8s_job).get("initContainers", [])]:
            assert not any("sleep" in part for part in [*container.get("command", []), *container.get("args", [])])


@pytest.mark.parametrize("mode", ["hfl", "vfl"])
def test_data_read_only_and_checkpoints_on_claims(mode: str, tmp_path: Path) -> None:
    docs = documents(SIM[mode])
    job = configmap_job(SIM[mode], tmp_path)
    claims = {d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim")}
    assert job.storage is not None
    for name, k8s_job in jobs_by_party(docs).items():
        container = party_container(k8s_job)
        by_path = mounts(container)
        spec = job.party(name).data or job.evaluation.data  # the hfl server: its test data
        data_mount = by_path[str(spec.path.parent)]
        assert data_mount["readOnly"] is True
        claim = volume(k8s_job, data_mount["name"])["persistentVolumeClaim"]
        assert claim["readOnly"] is True and claim["claimName"] == f"enclavefl-data-{name}"
        state = by_path[str(job.storage.checkpoint_dir)]
        assert volume(k8s_job, state["name"])["persistentVolumeClaim"]["claimName"] in claims
        outputs = [job.output.dir, *job.output.dir.parents]
        assert any(Path(p) in outputs for p in by_path if by_path[p]["name"] == "state"), "outputs not on the claim"
        key_file = Path(job.storage.key.removeprefix("file:"))
        key_mount = by_path[str(key_file.parent)]
        assert volume(k8s_job, key_mount["name"])["secret"]["defaultMode"] & 0o007 == 0  # not world-readable


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_pods_run_unprivileged(path: Path) -> None:
    for k8s_job in of_kind(documents(path), "Job"):
        spec = pod(k8s_job)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        for container in [*spec["containers"], *spec.get("initContainers", [])]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]


def _gibibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([KMG]i?)?", quantity).groups()
    return float(number) * {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "K": 2**-20, "M": 2**-10, "G": 1, None: 2**-30}[unit]


def test_sgx_variant_requests_epc_devices_and_the_measured_job() -> None:
    docs = documents(SGX)
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile.gramine").read_text()
    built = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    job = load_job(REPO / built["JOB"])  # the job the enclave image measures
    parties = jobs_by_party(docs)
    assert sorted(parties) == sorted(p.name for p in job.parties)
    assert re.search(r'^ARG PARTIES="' + " ".join(p.name for p in job.parties) + '"$', dockerfile, re.M)
    for name, k8s_job in parties.items():
        container = party_container(k8s_job)
        limits = container["resources"]["limits"]
        assert limits["sgx.intel.com/enclave"] == 1 and limits["sgx.intel.com/provision"] == 1
        assert _gibibytes(limits["sgx.intel.com/epc"]) >= _gibibytes(built["ENCLAVE_SIZE"])
        assert _gibibytes(limits["memory"]) > _gibibytes(limits["sgx.intel.com/epc"])
        assert {"name": "ENCLAVEFL_PARTY", "value": name} in container["env"]
        assert "args" not in container and "command" not in container  # the image runs gramine-sgx
        by_path = mounts(container)
        assert volume(k8s_job, by_path["/var/run/aesmd"]["name"])["hostPath"]["path"] == "/var/run/aesmd"
        assert by_path["/etc/sgx_default_qcnl.conf"]["readOnly"] is True
        policy_mount = by_path[str(Path("/etc/enclavefl") / job.policy.name)]
        assert policy_mount["subPath"] == job.policy.name  # a real file, not a ConfigMap symlink
        assert "/etc/enclavefl" not in by_path, "the measured job file comes from the image"
        assert job.storage is not None and str(job.storage.checkpoint_dir) in by_path
        assert pod(k8s_job)["nodeSelector"] == {"intel.feature.node.kubernetes.io/sgx": "true"}
