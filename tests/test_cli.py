"""The CLI contract: exit 0 accepted, 1 rejected (reason on stderr), 2 bad input; --json fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import PINNED_TIME, shared_file
from enclavefl.cli import main

SGX_MR_ENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
JSON_FIELDS = {
    "accepted", "reason", "tee", "mr_enclave", "mr_signer", "isv_prod_id", "isv_svn",
    "debug", "tcb_status", "advisory_ids", "report_data",
}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def sgx() -> tuple[Path, Path]:
    return shared_file("attestation", "sgx_quote"), shared_file("attestation", "sgx_quote_collateral.json")


def verify_sgx(sgx: tuple[Path, Path], *extra: str) -> tuple[int, dict, str]:
    quote, collateral = sgx
    code, out, err = run("verify", "--quote", str(quote), "--collateral", str(collateral),
                         "--at", str(PINNED_TIME), "--json", *extra)
    return code, json.loads(out), err


def test_verify_default_policy_rejects_sgx_tcb_with_claims(sgx: tuple[Path, Path]) -> None:
    code, result, err = verify_sgx(sgx)
    assert code == 1
    assert result.keys() >= JSON_FIELDS
    assert result["accepted"] is False
    assert result["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert result["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert result["mr_enclave"] == SGX_MR_ENCLAVE
    assert bytes.fromhex(result["report_data"]).rstrip(b"\0") == b"Hello, world!"
    assert "TCB status ConfigurationAndSWHardeningNeeded not allowed" in result["reason"]
    assert "ConfigurationAndSWHardeningNeeded" in err


def test_policy_init_then_verify_accepts(sgx: tuple[Path, Path], tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    code, out, err = run("policy", "init", "--out", str(policy), "--mr-enclave", SGX_MR_ENCLAVE,
                         "--allow-tcb-status", "ConfigurationAndSWHardeningNeeded")
    assert code == 0, err
    code, result, err = verify_sgx(sgx, "--policy", str(policy))
    assert code == 0, err
    assert result["accepted"] is True and result["reason"] is None


def test_verify_wrong_mr_enclave_names_field(sgx: tuple[Path, Path], tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    run("policy", "init", "--out", str(policy), "--mr-enclave", "ab" * 32,
        "--allow-tcb-status", "ConfigurationAndSWHardeningNeeded")
    code, result, _ = verify_sgx(sgx, "--policy", str(policy))
    assert code == 1
    assert result["check"] == "mr_enclave"
    assert "mr_enclave mismatch" in result["reason"]


def test_verify_bad_input_exits_2(sgx: tuple[Path, Path], tmp_path: Path) -> None:
    _, collateral = sgx
    code, _, err = run("verify", "--quote", str(tmp_path / "missing"), "--collateral", str(collateral))
    assert code == 2 and "cannot read" in err
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x03\x00" + b"\x00" * 40)
    code, _, err = run("verify", "--quote", str(junk), "--collateral", str(collateral), "--at", str(PINNED_TIME))
    assert code == 2 and "Traceback" not in err
    code, _, err = run("verify", "--collateral", str(collateral))
    assert code == 2 and "exactly one of" in err


def test_verify_after_collateral_expired_is_rejected(sgx: tuple[Path, Path]) -> None:
    quote, collateral = sgx
    code, out, _ = run("verify", "--quote", str(quote), "--collateral", str(collateral),
                       "--at", str(PINNED_TIME + 3 * 365 * 86400), "--json")
    assert code == 1
    assert json.loads(out)["check"] == "collateral-expired"


def test_attest_simulated_cert_verifies_only_when_policy_allows(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    code, _, err = run("attest", "--attester", "simulated", "--out", str(cert))
    assert code == 0, err
    assert b"PRIVATE KEY" not in cert.read_bytes()

    code, out, err = run("verify", "--cert", str(cert), "--json")
    assert code == 1
    assert json.loads(out)["check"] == "simulated"
    assert "simulated evidence not allowed" in err

    measured = tmp_path / "measure.json"
    code, out, _ = run("measure", "--json")
    assert code == 0
    measured.write_text(out)
    policy = tmp_path / "policy.json"
    code, _, err = run("policy", "init", "--out", str(policy), "--from-measure", str(measured),
                       "--allow-simulated-insecure")
    assert code == 0, err
    code, out, err = run("verify", "--cert", str(cert), "--policy", str(policy), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["tee"] == "simulated"
    assert result["mr_enclave"] == json.loads(measured.read_text())["mr_enclave"]


def test_attest_auto_without_tee_needs_opt_in(tmp_path: Path) -> None:
    code, _, err = run("attest", "--attester", "auto", "--out", str(tmp_path / "c.pem"))
    if code == 0:
        pytest.skip("this machine has a TEE")
    assert code == 2
    assert "allow-simulated-insecure" in err or "simulated" in err


def test_policy_init_refuses_overwrite_and_empty(tmp_path: Path) -> None:
    policy = tmp_path / "p.json"
    assert run("policy", "init", "--out", str(policy))[0] == 2
    policy.write_text("{}")
    code, _, err = run("policy", "init", "--out", str(policy), "--mr-enclave", "00" * 32)
    assert code == 2 and "exists" in err


def test_seal_unseal_roundtrip_and_refusal(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    assert run("keygen", str(key))[0] == 0
    plain = tmp_path / "model.bin"
    plain.write_bytes(b"weights" * 1000)
    sealed = tmp_path / "model.sealed"
    code, _, err = run("seal", str(plain), str(sealed), "--key", f"file:{key}", "--name", "model")
    assert code == 0, err
    out = tmp_path / "model.out"
    code, _, err = run("unseal", str(sealed), str(out), "--key", f"file:{key}", "--name", "model")
    assert code == 0, err
    assert out.read_bytes() == plain.read_bytes()

    code, _, err = run("unseal", str(sealed), str(tmp_path / "x"), "--key", f"file:{key}", "--name", "optimizer")
    assert code == 1 and "optimizer" in err
    assert not (tmp_path / "x").exists()
    code, _, err = run("unseal", str(sealed), str(tmp_path / "y"), "--key", "nope:thing", "--name", "model")
    assert code == 2


def test_verify_cert_with_invalid_x509_version_exits_2(tmp_path: Path) -> None:
    import hashlib

    from enclavefl.net.admission import make_identity
    from enclavefl.tee.attesters import SimulatedAttester
    from enclavefl.tee.measure import Measurement
    from enclavefl.tee.policy import Policy

    policy = Policy.from_values(allow_simulated=True)
    der = make_identity(SimulatedAttester(Measurement(hashlib.sha256(b"e").digest(), bytes(32))), policy).cert_der
    at = der.find(bytes([0xA0, 0x03, 0x02, 0x01, 0x02]))
    cert = tmp_path / "bad.der"
    cert.write_bytes(der[: at + 4] + b"\x07" + der[at + 5 :])
    policy_file = tmp_path / "policy.json"
    policy.save(policy_file)
    code, _, err = run("verify", "--cert", str(cert), "--policy", str(policy_file))
    assert code == 2
    assert "not a valid X509 version" in err and "Traceback" not in err


def test_policy_nested_deeply_exits_2(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"sgx_mrs": ' + "[" * 100_000 + "]" * 100_000 + "}")
    quote, collateral = shared_file("attestation", "sgx_quote"), shared_file("attestation", "sgx_quote_collateral.json")
    code, _, err = run("verify", "--quote", str(quote), "--collateral", str(collateral), "--policy", str(deep))
    assert code == 2
    assert "nested too deeply" in err and "Traceback" not in err
