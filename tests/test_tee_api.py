"""The trust layer's public API that `enclavefl verify`, `policy init` and `measure` are shells over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PINNED_TIME, shared_file
from enclavefl.errors import Check, UsageError
from enclavefl.tee import Policy, Verdict, check_quote, collateral_source, load_policy, read_measurement
from enclavefl.tee.verify import CLAIM_FIELDS

SGX_MR_ENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


def test_check_quote_refusal_by_policy_keeps_the_verified_claims() -> None:
    quote = shared_file("attestation", "sgx_quote").read_bytes()
    source = collateral_source(shared_file("attestation", "sgx_quote_collateral.json"))
    verdict = Verdict.of(lambda: check_quote(quote, policy=load_policy(None), collateral=source, at=PINNED_TIME))
    assert not verdict.accepted and verdict.error is not None
    assert verdict.error.check is Check.TCB_STATUS
    assert verdict.claims is not None and verdict.claims.mr_enclave.hex() == SGX_MR_ENCLAVE
    out = verdict.to_json()
    assert out["accepted"] is False and out["mr_enclave"] == SGX_MR_ENCLAVE and out["check"] == "tcb_status"

    lenient = Policy.from_measurements(
        [{"mr_enclave": SGX_MR_ENCLAVE}], allowed_tcb_status=["UpToDate", "ConfigurationAndSWHardeningNeeded"]
    )
    claims = check_quote(quote, policy=lenient, collateral=source, at=PINNED_TIME)
    assert claims.mr_enclave.hex() == SGX_MR_ENCLAVE


def test_a_verdict_without_claims_reports_every_claim_field_as_none() -> None:
    out = Verdict(None).to_json()
    assert out["accepted"] is True and out["reason"] is None and out["check"] is None
    assert all(out[name] is None for name in CLAIM_FIELDS)


def test_policy_from_measurements_pins_the_given_fields_over_each() -> None:
    first, second = "11" * 32, "22" * 32
    policy = Policy.from_measurements([{"mr_enclave": first, "mr_signer": "33" * 32}, {"mr_enclave": second}],
                                      mr_signer="44" * 32, isv_svn=3)  # fmt: skip
    assert [(e.mr_enclave, e.mr_signer, e.isv_svn) for e in policy.sgx_mrs] == [
        (first, "44" * 32, 3), (second, "44" * 32, 3)
    ]
    only_signer = Policy.from_measurements([], mr_signer="44" * 32)
    assert only_signer.enabled_sgx_fields == ("mr_signer",)
    assert not Policy.from_measurements([]).sgx_mrs


def test_read_measurement_refuses_what_measure_does_not_write(tmp_path: Path) -> None:
    good = tmp_path / "m.json"
    good.write_text(json.dumps({"mr_enclave": "11" * 32}))
    assert read_measurement(good) == {"mr_enclave": "11" * 32}
    for text in ("[1, 2]", "{not json"):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(UsageError, match="is not JSON from `enclavefl measure --json`"):
            read_measurement(bad)
    with pytest.raises(UsageError, match="missing.json"):
        read_measurement(tmp_path / "missing.json")


def test_every_public_name_resolves_and_loads_on_first_use() -> None:
    from enclavefl import tee

    assert set(tee._EXPORTS) == set(tee.__all__)
    for name in tee.__all__:
        assert getattr(tee, name).__module__ == tee._EXPORTS[name], name
    with pytest.raises(AttributeError):
        tee.NoSuchName  # noqa: B018
    # Measuring or writing a policy does not import quote verification (the CLI's start-up).
    code = "import sys, enclavefl.tee.measure, enclavefl.tee.policy; assert 'enclavefl.tee.quote' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
