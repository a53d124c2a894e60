"""Gramine-SGX manifests: what each party's enclave measures, allows, encrypts and runs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclavefl.cli import main
from enclavefl.errors import ConfigError, UsageError
from enclavefl.jobs.gramine import (
    CHECKPOINT_KEY_NAME,
    EnclaveParams,
    PythonRuntime,
    build_enclave,
    default_template_path,
    mount_key_name,
    plan_manifest,
    provision_mount_key,
    render_manifest,
    write_measurement,
)
from enclavefl.seal.keys import create_key_file
from enclavefl.tee.measure import Measurement, read_sigstruct
from enclavefl.tee.policy import Policy

SIGNER = "ab" * 32
ENCLAVE = "cd" * 32
TEMPLATE = default_template_path().read_text(encoding="utf-8")


def csv(path: Path) -> dict[str, Any]:
    return {"kind": "csv", "path": str(path), "label": "y"}


def write_job(tmp_path: Path, *, policy: dict[str, Any] | None = None, storage: dict[str, Any] | None = None,
              data_dir: Path | None = None, extra: dict[str, Any] | None = None) -> Path:
    """An hfl job in tmp/job/ whose parties' data lie in tmp/data/ (or `data_dir`)."""
    job_dir = tmp_path / "job"
    job_dir.mkdir(exist_ok=True)
    data_dir = data_dir or tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    for name in ("w0.csv", "w1.csv", "test.csv"):
        (data_dir / name).write_text("id,y,x0\n1,0,0.5\n")
    policy_obj = policy if policy is not None else {
        "verify_mr_signer": "on", "verify_isv_prod_id": "on", "verify_isv_svn": "on",
        "sgx_mrs": [{"mr_signer": SIGNER, "isv_prod_id": 7, "isv_svn": 2}],
    }
    (job_dir / "policy.json").write_text(json.dumps(policy_obj))
    job: dict[str, Any] = {
        "job": {"name": "fed", "mode": "hfl"},
        "parties": [
            {"name": "ps0", "role": "server", "address": "ps0:50051"},
            {"name": "worker0", "role": "worker", "data": csv(data_dir / "w0.csv")},
            {"name": "worker1", "role": "worker", "data": csv(data_dir / "w1.csv")},
        ],
        "tee": {"attester": "gramine"},
        "policy": "policy.json",
        "model": {"name": "mlp", "args": {"in_features": 1}},
        "strategy": {"name": "fedavg", "rounds": 1, "batch_size": 8, "lr": 0.1},
        "evaluation": {"where": "server", "data": csv(data_dir / "test.csv")},
        "output": {"dir": str(tmp_path / "out")},
        **({"storage": storage} if storage else {}),
        **(extra or {}),
    }
    path = job_dir / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def manifest(job: Path, party: str, **kwargs: Any) -> dict[str, Any]:
    return tomllib.loads(render_manifest(plan_manifest(job, party, **kwargs), TEMPLATE))


def trusted_paths(doc: dict[str, Any]) -> list[str]:
    return [entry["uri"].removeprefix("file:") for entry in doc["sgx"]["trusted_files"]]


def allowed_paths(doc: dict[str, Any]) -> list[str]:
    return [uri.removeprefix("file:") for uri in doc["sgx"]["allowed_files"]]


def covers(uri_path: str, path: Path) -> bool:
    """A trusted/allowed entry (directories end in /) covers `path`."""
    if uri_path.endswith("/"):
        return str(path).startswith(uri_path) or str(path) + "/" == uri_path
    return uri_path == str(path)


def walk_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in [f"{prefix}{key}", *walk_keys(value, f"{prefix}{key}.")]]
    if isinstance(node, list):
        return [k for item in node for k in walk_keys(item, prefix)]
    return []


def test_manifest_is_toml_and_measures_runtime_package_and_job(tmp_path: Path) -> None:
    job = write_job(tmp_path)
    doc = manifest(job, "worker0")
    runtime = PythonRuntime.current()
    trusted = trusted_paths(doc)
    for path in (runtime.executable, runtime.package / "__init__.py", runtime.stdlib / "os.py",
                 runtime.site_packages[0] / "yaml" / "__init__.py", job):
        assert any(covers(t, path) for t in trusted), f"{path} is not measured"
    assert "{{ gramine.libos }}" in trusted and "{{ gramine.runtimedir() }}/" in trusted
    assert doc["libos"]["entrypoint"] == str(runtime.executable)
    assert doc["loader"]["entrypoint"]["uri"] == "file:{{ gramine.libos }}"
    # The command is fixed in the measurement: this job, this party.
    assert doc["loader"]["argv"][1:] == ["-m", "enclavefl", "party", str(job), "--name", "worker0",
                                         "--out", str(tmp_path / "out")]
    # With storage, a restarted enclave resumes (the host cannot add the flag).
    with_storage = manifest(write_job(tmp_path, storage={"checkpoint_dir": str(tmp_path / "ckpt"),
                                                         "key": "sgx-seal:mrsigner", "checkpoint_every": 1}), "worker0")
    assert with_storage["loader"]["argv"][-1] == "--resume"


def test_data_directory_is_allowed_but_never_measured(tmp_path: Path) -> None:
    job = write_job(tmp_path)
    data = tmp_path / "data"
    for party in ("worker0", "ps0"):
        doc = manifest(job, party)
        assert f"{data}/" in allowed_paths(doc)
        assert not any(covers(t, data / "w0.csv") or t.startswith(str(data)) for t in trusted_paths(doc))
    # Two workers with different data build the same manifest apart from their name.
    w0, w1 = (render_manifest(plan_manifest(job, p), TEMPLATE) for p in ("worker0", "worker1"))
    assert w0.replace('"worker0"', '"worker1"') == w1


def test_never_debug_host_env_or_cmdline_passthrough(tmp_path: Path) -> None:
    doc = manifest(write_job(tmp_path, storage={"checkpoint_dir": str(tmp_path / "ckpt"),
                                                "key": "sgx-seal:mrsigner", "checkpoint_every": 1}), "ps0")
    assert doc["sgx"]["debug"] is False
    assert doc["sgx"]["remote_attestation"] == "dcap"
    assert doc["sgx"]["file_check_policy"] == "strict"
    keys = walk_keys(doc)
    assert not [k for k in keys if "insecure" in k], "an insecure__ option is set"
    assert all(isinstance(value, str) for value in doc["loader"]["env"].values()), "a passthrough env entry"
    assert "argv_src_file" not in doc["loader"] and "env_src_file" not in doc["loader"]
    assert doc["loader"]["log_level"] == "error"
    # The template itself sets none of them either (only its comments name them).
    code = "\n".join(line.split("#", 1)[0] for line in TEMPLATE.splitlines())
    assert "insecure__" not in code and "passthrough" not in code and "sgx.debug = false" in code


def test_gramine_manifest_jinja_pass_leaves_valid_toml(tmp_path: Path) -> None:
    # gramine-manifest renders the file with Jinja (StrictUndefined) before signing; our output
    # must survive that pass: only Gramine's own expressions, nothing else that looks like Jinja.
    jinja2 = pytest.importorskip("jinja2")
    text = render_manifest(plan_manifest(write_job(tmp_path), "worker0"), TEMPLATE)

    class Gramine:
        libos = "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"

        @staticmethod
        def runtimedir(libc: str = "glibc") -> str:
            return f"/usr/lib/x86_64-linux-gnu/gramine/runtime/{libc}"

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    final = tomllib.loads(env.from_string(text).render(gramine=Gramine))
    assert final["loader"]["entrypoint"]["uri"] == f"file:{Gramine.libos}"
    assert {"type": "chroot", "path": "/lib", "uri": f"file:{Gramine.runtimedir()}"} in final["fs"]["mounts"]
    assert trusted_paths(final)[:2] == [Gramine.libos, f"{Gramine.runtimedir()}/"]
    assert "{{" not in json.dumps(final)


def test_policy_pinning_signer_only_is_measured(tmp_path: Path) -> None:
    job = write_job(tmp_path)
    plan = plan_manifest(job, "ps0")
    assert plan.policy_measured
    doc = tomllib.loads(render_manifest(plan, TEMPLATE))
    policy = job.parent / "policy.json"
    assert str(policy) in trusted_paths(doc) and str(policy) not in allowed_paths(doc)


def test_policy_pinning_mr_enclave_is_not_measured(tmp_path: Path) -> None:
    job = write_job(tmp_path, policy={"sgx_mrs": [{"mr_enclave": ENCLAVE}]})
    plan = plan_manifest(job, "ps0")
    assert not plan.policy_measured
    doc = tomllib.loads(render_manifest(plan, TEMPLATE))
    policy = job.parent / "policy.json"
    assert str(policy) in allowed_paths(doc) and str(policy) not in trusted_paths(doc)
    with pytest.raises(ConfigError, match="pins mr_enclave"):
        plan_manifest(job, "ps0", measure_policy=True)


def test_checkpoints_on_an_encrypted_mount_keyed_by_sealing_key(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    job = write_job(tmp_path, storage={"checkpoint_dir": str(ckpt), "key": "sgx-seal:mrenclave", "checkpoint_every": 1})
    doc = manifest(job, "ps0")
    encrypted = [m for m in doc["fs"]["mounts"] if m["type"] == "encrypted"]
    assert encrypted == [{"type": "encrypted", "path": str(ckpt / "ps0"), "uri": f"file:{ckpt / 'ps0'}",
                          "key_name": "_sgx_mrenclave"}]
    assert doc["fs"]["mounts"][-1] == encrypted[0], "the encrypted mount must come after the chroot ones"
    assert not any(str(ckpt) in p for p in [*allowed_paths(doc), *trusted_paths(doc)])


def test_broker_checkpoint_key_is_provisioned_by_the_party(tmp_path: Path) -> None:
    job = write_job(tmp_path, storage={"checkpoint_dir": str(tmp_path / "ckpt"), "key": "broker:kb:50070/fed",
                                       "checkpoint_every": 1})
    plan = plan_manifest(job, "worker1")
    assert plan.checkpoint_mount is not None and plan.checkpoint_mount.key_name == CHECKPOINT_KEY_NAME
    assert any("provision_mount_key" in note for note in plan.notes)
    assert mount_key_name("sgx-seal:mrsigner") == "_sgx_mrsigner"
    with pytest.raises(ConfigError, match="sgx-seal kind"):
        mount_key_name("sgx-seal:other")


def test_job_variables_are_fixed_in_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    job = write_job(tmp_path)
    text = job.read_text().replace(str(data), "${FED_DATA}")
    job.write_text(text)
    monkeypatch.setenv("FED_DATA", str(data))
    doc = manifest(job, "worker0")
    assert doc["loader"]["env"]["FED_DATA"] == str(data)
    assert f"{data}/" in allowed_paths(doc)
    job.write_text(text.replace("${FED_DATA}", "${HOME}"))
    monkeypatch.setenv("HOME", str(data))
    with pytest.raises(ConfigError, match="HOME"):
        plan_manifest(job, "worker0")


def test_data_beside_the_job_file_allows_only_the_data_file(tmp_path: Path) -> None:
    job = write_job(tmp_path, data_dir=tmp_path / "job")
    plan = plan_manifest(job, "worker0")
    doc = tomllib.loads(render_manifest(plan, TEMPLATE))
    assert str(tmp_path / "job" / "w0.csv") in allowed_paths(doc)
    assert f"{tmp_path / 'job'}/" not in allowed_paths(doc)
    assert any("keep data in its own directory" in note for note in plan.notes)


def test_output_directory_holding_the_job_is_refused(tmp_path: Path) -> None:
    job = write_job(tmp_path, extra={"output": {"dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match="both measured and unmeasured"):
        plan_manifest(job, "ps0")


def test_enclave_parameters(tmp_path: Path) -> None:
    params = EnclaveParams(enclave_size="16G", max_threads=96, isv_prod_id=7, isv_svn=3, edmm=True, torch_threads=8)
    doc = manifest(write_job(tmp_path), "ps0", params=params)
    sgx = doc["sgx"]
    assert (sgx["enclave_size"], sgx["max_threads"], sgx["isvprodid"], sgx["isvsvn"], sgx["edmm_enable"]) == (
        "16G", 96, 7, 3, True)
    assert doc["loader"]["env"]["OMP_NUM_THREADS"] == "8"
    for bad in ({"enclave_size": "8GB"}, {"max_threads": 2}, {"isv_svn": 70000}, {"torch_threads": 64}):
        with pytest.raises(UsageError):
            EnclaveParams(**bad)


def test_unknown_party_and_gramine_syntax_in_paths(tmp_path: Path) -> None:
    job = write_job(tmp_path)
    with pytest.raises(UsageError, match="no party 'worker9'"):
        plan_manifest(job, "worker9")
    odd = tmp_path / "x{{y}}"
    odd.mkdir()
    job2 = write_job(odd)
    with pytest.raises(ConfigError, match="may not contain"):
        render_manifest(plan_manifest(job2, "ps0"), TEMPLATE)
    with pytest.raises(ConfigError, match="unknown placeholder"):
        render_manifest(plan_manifest(job, "ps0"), TEMPLATE + "\n${nope}\n")


def test_build_without_gramine_renders_and_says_what_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "no-tools"
    empty.mkdir()
    result = build_enclave(write_job(tmp_path), "worker1", out_dir=tmp_path / "build", tool_path=str(empty))
    assert not result.signed and result.measurement is None
    assert result.missing_tools == ("gramine-manifest", "gramine-sgx-sign")
    assert result.template == tmp_path / "build" / "enclavefl.manifest.template"
    doc = tomllib.loads(result.template.read_text())
    assert doc["loader"]["argv"][6] == "worker1"
    assert not (tmp_path / "build" / "measurement.json").exists()
    assert (tmp_path / "build" / "host-dirs").read_text().splitlines() == [str(tmp_path / "out")]


@pytest.mark.skipif(shutil.which("gramine-sgx-sign") is None or shutil.which("gramine-manifest") is None,
                    reason="Gramine is not installed here (gramine-manifest, gramine-sgx-sign)")
def test_build_with_gramine_signs_and_reads_the_measurement(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=3, key_size=3072)
    pem = tmp_path / "enclave-key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    params = EnclaveParams(isv_prod_id=7, isv_svn=2)
    result = build_enclave(write_job(tmp_path), "ps0", out_dir=tmp_path / "build", signing_key=pem, params=params)
    assert result.signed and result.sigstruct is not None
    assert read_sigstruct(result.sigstruct) == result.measurement
    modulus = key.public_key().public_numbers().n.to_bytes(384, "little")
    assert result.measurement.mr_signer == hashlib.sha256(modulus).digest()
    assert (result.measurement.isv_prod_id, result.measurement.isv_svn) == (7, 2)
    assert json.loads((tmp_path / "build" / "measurement.json").read_text()) == result.measurement.to_json()


def test_measurement_file_feeds_policy_init(tmp_path: Path) -> None:
    measured = Measurement(bytes.fromhex(ENCLAVE), bytes.fromhex(SIGNER), isv_prod_id=7, isv_svn=2)
    write_measurement(measured, tmp_path / "ps0.json")
    write_measurement(Measurement(b"\x01" * 32, bytes.fromhex(SIGNER), 7, 2), tmp_path / "worker0.json")
    out = tmp_path / "policy.json"
    result = CliRunner().invoke(main, ["policy", "init", "--out", str(out),
                                       "--from-measure", str(tmp_path / "ps0.json"),
                                       "--from-measure", str(tmp_path / "worker0.json")])
    assert result.exit_code == 0, result.output
    policy = Policy.load(out)
    assert policy.enabled_sgx_fields == ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn")
    assert {e.mr_enclave for e in policy.sgx_mrs} == {ENCLAVE, "01" * 32}
    assert not policy.allow_debug and not policy.allow_simulated


def test_provision_mount_key_writes_a_derived_16_byte_key(tmp_path: Path) -> None:
    keys = tmp_path / "attestation-keys"  # stands in for /dev/attestation/keys (no SGX here)
    keys.mkdir()
    source = create_key_file(tmp_path / "kek.key")
    provision_mount_key(source, keys_dir=keys)
    first = (keys / CHECKPOINT_KEY_NAME).read_bytes()
    assert len(first) == 16 and first != source.kek()[:16]
    provision_mount_key(source, keys_dir=keys)
    assert (keys / CHECKPOINT_KEY_NAME).read_bytes() == first
    provision_mount_key(source, keys_dir=keys, name="other")
    assert (keys / "other").read_bytes() != first
    with pytest.raises(UsageError, match="Gramine's own"):
        provision_mount_key(source, keys_dir=keys, name="_sgx_mrsigner")
    with pytest.raises(UsageError, match="only inside a Gramine enclave"):
        provision_mount_key(source, keys_dir=tmp_path / "absent")


@pytest.mark.parametrize("party", ["ps0", "worker0", "worker1"])
def test_shipped_sgx_job_renders_for_every_party(party: str) -> None:
    job = Path(__file__).resolve().parents[1] / "deploy" / "docker" / "jobs" / "hfl-sgx.yaml"
    plan = plan_manifest(job, party)
    doc = tomllib.loads(render_manifest(plan, TEMPLATE))
    assert not plan.policy_measured  # the shipped placeholder pins mr_enclave
    assert plan.checkpoint_mount is not None and plan.checkpoint_mount.key_name == "_sgx_mrsigner"
    assert plan.notes == ()  # no simulated attester, no host key file, data apart from code
    assert f"/data/{party}/" in allowed_paths(doc)


def test_keras_party_gets_tensorflow_threads_backend_and_trusted_libraries(tmp_path: Path) -> None:
    job = write_job(tmp_path, extra={"model": {"framework": "keras", "name": "mlp", "args": {"in_features": 1}}})
    doc = manifest(job, "worker0", params=EnclaveParams(torch_threads=6))
    env = doc["loader"]["env"]
    assert env["KERAS_BACKEND"] == "tensorflow" and env["TF_NUM_INTRAOP_THREADS"] == "6"
    assert env["TF_NUM_INTEROP_THREADS"] == "2" and env["KERAS_HOME"].startswith("/tmp")
    # The [tf] extra's native libraries must be measured; found without importing TensorFlow (seconds).
    tensorflow = importlib.util.find_spec("tensorflow")
    assert tensorflow is not None and tensorflow.origin is not None, "the [tf] extra is installed by `make test`"
    library = next(Path(tensorflow.origin).parent.rglob("*.so*"))
    assert any(covers(p, library.resolve()) for p in trusted_paths(doc)), library
    (tmp_path / "torch").mkdir()
    assert "KERAS_BACKEND" not in manifest(write_job(tmp_path / "torch"), "worker0")["loader"]["env"]
    with pytest.raises(ConfigError, match="needs at least 4G"):
        plan_manifest(job, "worker0", params=EnclaveParams(enclave_size="2G"))
    with pytest.raises(ConfigError, match="max_threads 24: a Keras/TensorFlow party needs at least 30"):
        plan_manifest(job, "worker0", params=EnclaveParams(max_threads=24))
