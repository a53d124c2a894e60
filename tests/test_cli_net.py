"""The attested-channel commands as scripts use them: echo-server/echo-client and the key
broker, each run as a real `python -m enclavefl` process on loopback (simulated attestation)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

import enclavefl
from enclavefl.seal.keys import FileKeySource

SIM = ("--attester", "simulated")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def enclavefl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "enclavefl", *args]


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        enclavefl_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@contextmanager
def serving(*args: str, cwd: Path, stop_signal: int = signal.SIGTERM) -> Iterator[str]:
    """Run a serving command, yield the HOST:PORT of its `listening on` line, then stop it
    with `stop_signal` and check it exits 0 without a traceback. Always killed at the end."""
    fd, name = tempfile.mkstemp(prefix=f"{args[0]}-", suffix=".log", dir=cwd)
    log_path = Path(name)
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(enclavefl_cmd(*args), cwd=cwd, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(proc.stdout.readline)
            try:
                line = pending.result(timeout=READY_TIMEOUT_S)
            finally:
                if not pending.done():
                    proc.kill()  # ends the blocked readline so the pool can shut down
        assert line.startswith("listening on "), f"no listening line (got {line!r}):\n{log_path.read_text()}"
        yield line.removeprefix("listening on ").strip()
        proc.send_signal(stop_signal)
        code = proc.wait(timeout=STOP_TIMEOUT_S)
        logged = log_path.read_text()
        assert code == 0, f"server exited {code} after {signal.Signals(stop_signal).name}:\n{logged}"
        assert "Traceback" not in logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-net")


@pytest.fixture(scope="module")
def measured(work: Path) -> str:
    """This install's simulated mr_enclave, as `enclavefl measure --json` reports it."""
    result = cli("measure", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["mr_enclave"]


def write_policy(path: Path, mr_enclave: str) -> Path:
    path.write_text(json.dumps({
        "verify_mr_enclave": "on",
        "sgx_mrs": [{"mr_enclave": mr_enclave}],
        "allow_simulated": True,
    }))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def good_policy(work: Path, measured: str) -> Path:
    return write_policy(work / "policy.json", measured)


@pytest.fixture(scope="module")
def echo_server(work: Path, good_policy: Path) -> Iterator[str]:
    with serving("echo-server", "--port", "0", "--policy", str(good_policy), *SIM, cwd=work) as address:
        yield address


def test_echo_client_accepted_prints_claims_and_throughput(
    echo_server: str, good_policy: Path, measured: str, work: Path
) -> None:
    result = cli("echo-client", echo_server, "--policy", str(good_policy), "--megabytes", "1", *SIM, cwd=work)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "accepted"
    assert "server_party: echo-server" in lines
    assert "tee: simulated" in lines
    assert f"mr_enclave: {measured}" in lines
    throughput = re.search(r"^throughput_mb_s: ([0-9.]+)$", result.stdout, re.MULTILINE)
    assert throughput is not None and float(throughput.group(1)) > 0

    result = cli("echo-client", echo_server, "--policy", str(good_policy), "--megabytes", "1", "--json", *SIM,
                 cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["accepted"] is True and data["reason"] is None
    assert data["server"] == echo_server and data["server_party"] == "echo-server"
    assert data["tee"] == "simulated" and data["mr_enclave"] == measured
    assert data["megabytes"] == 1.0 and data["throughput_mb_s"] > 0


def test_echo_client_refuses_other_mr_enclave_and_server_goes_on(
    echo_server: str, good_policy: Path, measured: str, work: Path
) -> None:
    pinned_elsewhere = write_policy(work / "other-enclave.json", "ab" * 32)
    result = cli("echo-client", echo_server, "--policy", str(pinned_elsewhere), "--json", *SIM, cwd=work)
    assert result.returncode == 1
    assert "enclavefl: rejected: mr_enclave mismatch" in result.stderr
    assert "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    assert data["accepted"] is False and data["check"] == "mr_enclave"
    assert data["mr_enclave"] == measured  # what the refused server is
    assert "throughput_mb_s" not in data

    result = cli("echo-client", echo_server, "--policy", str(good_policy), "--megabytes", "0.5", "--json", *SIM,
                 cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accepted"] is True


def tampered_package(root: Path) -> Path:
    """A copy of the installed package with one edited file: another simulated mr_enclave."""
    package = root / "enclavefl"
    shutil.copytree(Path(enclavefl.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    with (package / "__init__.py").open("a") as f:
        f.write("\n# tampered\n")
    return root


def test_keybroker_releases_keys_only_to_admitted_clients(work: Path, good_policy: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    result = cli("keybroker", "create-key", "--keys", str(keys), "model-key", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(keys / "model-key") in result.stdout
    secret = FileKeySource(keys / "model-key").kek().hex()
    outputs = [result.stdout, result.stderr]

    plain, sealed, back = tmp_path / "model.bin", tmp_path / "model.sealed", tmp_path / "model.out"
    plain.write_bytes(os.urandom(4096))
    client = ("--policy", str(good_policy), "--job-id", "job-7", "--name", "model", *SIM)
    serve = ("keybroker", "serve", "--policy", str(good_policy), "--keys", str(keys), "--port", "0",
             "--job-id", "job-7", *SIM)  # fmt: skip
    with serving(*serve, cwd=tmp_path, stop_signal=signal.SIGINT) as address:
        spec = f"broker:{address}/model-key"
        result = cli("seal", str(plain), str(sealed), "--key", spec, *client, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outputs += [result.stdout, result.stderr]
        result = cli("unseal", str(sealed), str(back), "--key", spec, *client, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outputs += [result.stdout, result.stderr]
        assert back.read_bytes() == plain.read_bytes()

        # The same code with one file changed has another mr_enclave: the broker refuses it.
        env = {**os.environ, "PYTHONPATH": str(tampered_package(tmp_path / "tampered"))}
        result = cli("seal", str(plain), str(tmp_path / "t.sealed"), "--key", spec, *client, cwd=tmp_path, env=env)
        assert result.returncode == 1, result.stderr
        assert "rejected" in result.stderr and "mr_enclave mismatch" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "t.sealed").exists()
        outputs += [result.stdout, result.stderr]

        # A client of another job is refused as well.
        other_job = ("--policy", str(good_policy), "--job-id", "job-8", "--name", "model", *SIM)
        result = cli("seal", str(plain), str(tmp_path / "j.sealed"), "--key", spec, *other_job, cwd=tmp_path)
        assert result.returncode == 1 and "job id mismatch" in result.stderr
        outputs += [result.stdout, result.stderr]

    # It was the broker's key that sealed the file: the key file itself opens it.
    result = cli("unseal", str(sealed), str(tmp_path / "direct.out"), "--key", f"file:{keys / 'model-key'}",
                 "--job-id", "job-7", "--name", "model", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "direct.out").read_bytes() == plain.read_bytes()
    assert not any(secret in text.lower() for text in outputs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("echo-client", "nohostport"), "expected HOST:PORT"),
        (("echo-client", "127.0.0.1:1", "--megabytes", "-1"), "--megabytes"),
        (("echo-client", "127.0.0.1:1", "--policy", "missing.json"), "cannot read policy"),
        (("keybroker", "serve", "--keys", "keys"), "--policy"),
        (("keybroker", "create-key", "--keys", "keys", "../escape"), "key name"),
    ],
)
def test_bad_usage_exits_2(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    result = cli(*args, *SIM, cwd=tmp_path) if args[0] == "echo-client" else cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_client_asks_for_the_certificate_name_so_grpc_logs_no_mismatch(work: Path, good_policy: Path) -> None:
    """Dialing `localhost` must not make the server's gRPC log `No match found for server
    name: localhost`: clients ask for the name the RA-TLS certificate holds (SNI)."""
    folder = work / "sni"
    folder.mkdir()
    with serving("echo-server", "--port", "0", "--policy", str(good_policy), *SIM, cwd=folder) as address:
        port = address.rpartition(":")[2]
        done = cli("echo-client", f"localhost:{port}", "--policy", str(good_policy), *SIM, "--megabytes", "1",
                   cwd=folder)
        assert done.returncode == 0, done.stderr
    server_log = next(folder.glob("echo-server-*.log")).read_text()
    assert "admitted party echo-client" in server_log
    assert "No match found for server name" not in server_log + done.stderr
