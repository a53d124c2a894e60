"""Quote verification of the real SGX and TDX sample quotes, and how each failure is named."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import PINNED_TIME

from enclavefl.errors import FormatError, PolicyRejected, QuoteRejected, Rejected, UsageError
from enclavefl.tee.claims import TeeType
from enclavefl.tee.collateral import OfflineCollateral
from enclavefl.tee.policy import Policy
from enclavefl.tee.quote import MAX_QUOTE_SIZE, verify_quote

SGX_MR_ENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SGX_MR_SIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
SGX_STATUS = "ConfigurationAndSWHardeningNeeded"
TDX_MR_TD = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)
COLLATERAL_EXPIRES = 1752919278  # 2025-07-19T10:01:18Z, the SGX QE identity's nextUpdate
HEADER, SGX_BODY = 48, 384


@pytest.fixture
def sgx_collateral(attestation_dir: Path) -> OfflineCollateral:
    return OfflineCollateral(attestation_dir / "sgx_quote_collateral.json")


@pytest.fixture
def tdx_collateral(attestation_dir: Path) -> OfflineCollateral:
    return OfflineCollateral(attestation_dir / "tdx_quote_collateral.json")


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def test_sgx_sample_claims(sgx_quote: bytes, sgx_collateral: OfflineCollateral) -> None:
    claims = verify_quote(sgx_quote, sgx_collateral, at=PINNED_TIME)
    assert claims.tee is TeeType.SGX
    assert claims.tcb_status == SGX_STATUS
    assert claims.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert claims.mr_enclave.hex() == SGX_MR_ENCLAVE
    assert claims.mr_signer.hex() == SGX_MR_SIGNER
    assert (claims.isv_prod_id, claims.isv_svn) == (0, 0)
    assert claims.debug is False
    assert claims.report_data == b"Hello, world!".ljust(64, b"\0")
    assert (claims.mr_td, claims.rtmrs) == (b"", ())


def test_tdx_sample_claims(tdx_quote: bytes, tdx_collateral: OfflineCollateral) -> None:
    claims = verify_quote(tdx_quote, tdx_collateral, at=PINNED_TIME)
    assert claims.tee is TeeType.TDX
    assert claims.tcb_status == "UpToDate"
    assert claims.advisory_ids == ()
    assert claims.mr_td.hex() == TDX_MR_TD
    assert len(claims.rtmrs) == 4 and all(len(r) == 48 for r in claims.rtmrs)
    assert claims.rtmrs[0].hex().startswith("44c0197b3915")
    assert claims.rtmrs[3] == bytes(48)
    assert claims.debug is False
    assert len(claims.report_data) == 64 and claims.report_data[:4].hex() == "9a9d48e7"
    assert (claims.mr_enclave, claims.mr_signer) == (b"", b"")


def test_isv_ids_are_read_from_the_report_body(sgx_quote: bytes) -> None:
    # The sample's own ids are both 0; the QE report inside it (same layout) has 1 and 10,
    # which shows the offsets are right.
    qe_report = HEADER + SGX_BODY + 4 + 64 + 64
    assert struct.unpack_from("<HH", sgx_quote, qe_report + 256) == (1, 10)


def test_bytearray_and_memoryview_accepted(
    sgx_quote: bytes, sgx_collateral: OfflineCollateral
) -> None:
    expected = verify_quote(sgx_quote, sgx_collateral, at=PINNED_TIME)
    assert verify_quote(bytearray(sgx_quote), sgx_collateral, at=PINNED_TIME) == expected
    assert verify_quote(memoryview(sgx_quote), sgx_collateral, at=PINNED_TIME) == expected


# -- the issue's table: accepted by one policy, each rejection with its own check -------------


def _pinned(**overrides: object) -> Policy:
    values: dict[str, object] = {"mr_enclave": SGX_MR_ENCLAVE, "allowed_tcb_status": [SGX_STATUS]}
    values.update(overrides)
    return Policy.from_values(**values)  # type: ignore[arg-type]


def test_sgx_sample_accepted_by_pinning_policy(
    sgx_quote: bytes, sgx_collateral: OfflineCollateral
) -> None:
    _pinned().check(verify_quote(sgx_quote, sgx_collateral, at=PINNED_TIME))


@pytest.mark.parametrize(
    "policy, check, reason",
    [
        (Policy.default(), "tcb_status",
         f"TCB status {SGX_STATUS} not allowed (allowed: UpToDate)"),
        (_pinned(mr_enclave="ab12" * 16), "mr_enclave",
         "mr_enclave mismatch: got 33d8736db756…, policy allows [ab12ab12ab12…]"),
        (_pinned(mr_signer="cd34" * 16), "mr_signer",
         "mr_signer mismatch: got 815f42f11cf6…, policy allows [cd34cd34cd34…]"),
        (_pinned(isv_svn=1), "isv_svn", "isv_svn 0 below minimum 1"),
        (_pinned(isv_prod_id=7), "isv_prod_id", "isv_prod_id mismatch: got 0, policy allows [7]"),
    ],
)  # fmt: skip
def test_sgx_sample_rejected_by_policy(
    sgx_quote: bytes,
    sgx_collateral: OfflineCollateral,
    policy: Policy,
    check: str,
    reason: str,
) -> None:
    claims = verify_quote(sgx_quote, sgx_collateral, at=PINNED_TIME)
    with pytest.raises(PolicyRejected) as info:
        policy.check(claims)
    assert (info.value.check, info.value.reason) == (check, reason)


@pytest.mark.parametrize("offset", [HEADER, HEADER + 64, HEADER + 96, HEADER + 256, HEADER + 383])
def test_flipped_report_body_byte_fails_signature(
    sgx_quote: bytes, sgx_collateral: OfflineCollateral, offset: int
) -> None:
    with pytest.raises(QuoteRejected) as info:
        verify_quote(_flip(sgx_quote, offset), sgx_collateral, at=PINNED_TIME)
    assert info.value.check == "signature"
    assert "signature over the report body is invalid" in info.value.reason


def test_flipped_tdx_body_byte_fails_signature(
    tdx_quote: bytes, tdx_collateral: OfflineCollateral
) -> None:
    with pytest.raises(QuoteRejected) as info:
        verify_quote(_flip(tdx_quote, HEADER + 136), tdx_collateral, at=PINNED_TIME)
    assert info.value.check == "signature"


def test_time_after_collateral_expiry(sgx_quote: bytes, sgx_collateral: OfflineCollateral) -> None:
    with pytest.raises(QuoteRejected) as info:
        verify_quote(sgx_quote, sgx_collateral, at=1767225600)  # 2026-01-01
    assert info.value.check == "collateral-expired"
    assert info.value.reason == (
        "collateral expired at 2025-07-19T10:01:18Z"
        " (QE identity nextUpdate; verification time 2026-01-01T00:00:00Z)"
    )


def test_expiry_boundary(sgx_quote: bytes, sgx_collateral: OfflineCollateral) -> None:
    verify_quote(sgx_quote, sgx_collateral, at=COLLATERAL_EXPIRES - 1)
    with pytest.raises(QuoteRejected, match="collateral expired at 2025-07-19T10:01:18Z"):
        verify_quote(sgx_quote, sgx_collateral, at=COLLATERAL_EXPIRES + 1)


def test_tdx_expiry_names_the_crl(tdx_quote: bytes, tdx_collateral: OfflineCollateral) -> None:
    with pytest.raises(QuoteRejected) as info:
        verify_quote(tdx_quote, tdx_collateral, at=1767225600)
    assert info.value.check == "collateral-expired"
    assert "PCK CRL nextUpdate" in info.value.reason


def test_default_time_is_now(sgx_quote: bytes, sgx_collateral: OfflineCollateral) -> None:
    # The sample collateral expired in July 2025, so "now" must be refused.
    with pytest.raises(QuoteRejected) as info:
        verify_quote(sgx_quote, sgx_collateral)
    assert info.value.check == "collateral-expired"


def test_time_before_collateral_issue(sgx_quote: bytes, sgx_collateral: OfflineCollateral) -> None:
    with pytest.raises(QuoteRejected) as info:
        verify_quote(sgx_quote, sgx_collateral, at=1700000000)
    assert info.value.check == "collateral-not-yet-valid"
    assert "issued at 2025-06-19T10:56:11Z" in info.value.reason


@pytest.mark.parametrize("length", [0, 1, 47, 48, 300, 432, 436, 1000, 4000, 4599])
def test_truncated_quote_is_format_error(
    sgx_quote: bytes, sgx_collateral: OfflineCollateral, length: int
) -> None:
    with pytest.raises(FormatError, match=rf"not a DCAP quote \({length} bytes\)"):
        verify_quote(sgx_quote[:length], sgx_collateral, at=PINNED_TIME)


def test_truncated_file_is_format_error(
    tmp_path: Path, sgx_quote: bytes, sgx_collateral: OfflineCollateral
) -> None:
    path = tmp_path / "quote"
    path.write_bytes(sgx_quote[: len(sgx_quote) // 2])
    with pytest.raises(FormatError, match="Not enough data"):
        verify_quote(path.read_bytes(), sgx_collateral, at=PINNED_TIME)


def test_unsupported_version_is_format_error(
    sgx_quote: bytes, sgx_collateral: OfflineCollateral
) -> None:
    quote = struct.pack("<H", 9) + sgx_quote[2:]
    with pytest.raises(FormatError, match="Unsupported quote version"):
        verify_quote(quote, sgx_collateral, at=PINNED_TIME)


def test_collateral_of_other_tee(sgx_quote: bytes, tdx_collateral: OfflineCollateral) -> None:
    with pytest.raises(QuoteRejected) as info:
        verify_quote(sgx_quote, tdx_collateral, at=PINNED_TIME)
    assert info.value.check == "collateral-mismatch"


def test_tampered_pck_chain(tdx_quote: bytes, tdx_collateral: OfflineCollateral) -> None:
    with pytest.raises(QuoteRejected) as info:
        verify_quote(_flip(tdx_quote, 3000), tdx_collateral, at=PINNED_TIME)
    assert info.value.check == "certificate-chain"


@pytest.mark.parametrize(
    "field, check",
    [("tcb_info_signature", "collateral-signature"), ("qe_identity_signature", "collateral-signature"),
     ("pck_crl", "certificate-chain"), ("root_ca_crl", "certificate-chain")],
)  # fmt: skip
def test_tampered_collateral(
    tmp_path: Path, attestation_dir: Path, sgx_quote: bytes, field: str, check: str
) -> None:
    doc = json.loads((attestation_dir / "sgx_quote_collateral.json").read_text())
    value = doc[field]
    doc[field] = value[:-2] + ("00" if value[-2:] != "00" else "01")  # last signature byte
    path = tmp_path / "collateral.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(QuoteRejected) as info:
        verify_quote(sgx_quote, OfflineCollateral(path), at=PINNED_TIME)
    assert info.value.check == check


@pytest.mark.parametrize("bad", ["quote", 42, None, ["x"]])
def test_non_bytes_quote(sgx_collateral: OfflineCollateral, bad: object) -> None:
    with pytest.raises(FormatError, match="a quote must be bytes"):
        verify_quote(bad, sgx_collateral, at=PINNED_TIME)  # type: ignore[arg-type]


def test_oversized_quote(sgx_quote: bytes, sgx_collateral: OfflineCollateral) -> None:
    with pytest.raises(FormatError, match="more than the"):
        verify_quote(sgx_quote + bytes(MAX_QUOTE_SIZE), sgx_collateral, at=PINNED_TIME)


@pytest.mark.parametrize("at", [-1, 2**64, 1.5, True, "now"])
def test_bad_verification_time(
    sgx_quote: bytes, sgx_collateral: OfflineCollateral, at: object
) -> None:
    with pytest.raises(UsageError, match="verification time"):
        verify_quote(sgx_quote, sgx_collateral, at=at)  # type: ignore[arg-type]


def test_rejections_are_rejected_family(
    sgx_quote: bytes, sgx_collateral: OfflineCollateral
) -> None:
    with pytest.raises(Rejected) as info:
        verify_quote(_flip(sgx_quote, HEADER), sgx_collateral, at=PINNED_TIME)
    assert info.value.exit_code == 1
