"""Verify an Intel SGX (DCAP quote v3) or TDX (quote v4, v5) quote and return its claims.

dcap-qvl checks the PCK certificate chain up to Intel's root CA, the CRLs, the QE report and
its identity, the quote signature and the platform TCB level at the verification time.
`verify_quote` turns its outcome into `Claims` or a typed error; it does not judge the TCB
status or the identity (that is `Policy.check`).
"""

from __future__ import annotations

import re
import struct
import time

import dcap_qvl

from enclavefl.errors import Check, FormatError, QuoteRejected, UsageError
from enclavefl.tee.claims import Claims, TeeType
from enclavefl.tee.collateral import CollateralSource, collateral_validity, isotime
from enclavefl.validate import is_int

__all__ = ["MAX_QUOTE_SIZE", "verify_quote"]

MAX_QUOTE_SIZE = 64 * 1024  # real quotes are 4-8 KiB

_TEE_SGX = 0x00000000
_TEE_TDX = 0x00000081
_HEADER_SIZE = 48
_SGX_ISV_IDS = _HEADER_SIZE + 256  # isv_prod_id, isv_svn: u16 LE in the SGX report body
_SGX_ATTRIBUTES_DEBUG = 0x02  # ATTRIBUTES.FLAGS bit 1
_TD_ATTRIBUTES_DEBUG = 0x01  # TD_ATTRIBUTES bit 0 (TUD.DEBUG)

# dcap-qvl failures that mean the bytes are not a quote it can read.
_UNPARSEABLE = (
    "failed to decode quote",
    "not enough data",
    "unsupported quote version",
    "unsupported body type",
    "invalid body size",
    "unsupported dcap attestation key type",
    "unsupported dcap quote version",
    "unsupported tee type",
    "must have version",
    "unsupported certification data type",
    "unsupported cert type",
)
_TIME_FAILURES = ("expired", "in the future", "not valid yet", "notvalidyet")
# (substring of dcap-qvl's message, check name, what it means), first match wins.
_FAILURES = (
    (
        "isv enclave report signature is invalid",
        "signature",
        "quote signature over the report body is invalid (altered, or not signed by the"
        " attestation key)",
    ),
    ("failed to decode", "collateral-format", "collateral cannot be decoded"),
    ("qe report hash mismatch", "qe-report", "QE report does not bind the attestation key"),
    ("signature is invalid for qe_report", "qe-report", "QE report is not signed by the PCK key"),
    ("qe report", "qe-report", "QE report rejected"),
    ("signature is invalid for tcb_info", "collateral-signature", "TCB info signature invalid"),
    (
        "signature is invalid for qe_identity",
        "collateral-signature",
        "QE identity signature invalid",
    ),
    ("unsupported qe identity", "collateral-mismatch", "collateral is for another TEE type"),
    ("non-sgx tcb info", "collateral-mismatch", "collateral is for another TEE type"),
    ("fmspc", "collateral-mismatch", "collateral is for another platform (FMSPC)"),
    ("revoked", "revoked", "certificate or platform revoked"),
    ("crl", "certificate-chain", "CRL rejected"),
    ("certificate", "certificate-chain", "certificate chain rejected"),
    ("pck", "certificate-chain", "PCK certificate rejected"),
    ("tdx module", "tdx-module", "TDX module identity rejected"),
    ("qe ", "qe-identity", "quoting enclave does not match its QE identity"),
    ("tcb", "tcb", "no TCB level matches the platform"),
)


def verify_quote(quote: bytes, collateral: CollateralSource, *, at: int | None = None) -> Claims:
    """Verify `quote` against collateral at unix time `at` (default: now); return its claims.

    Raises FormatError for bytes that are not a supported quote, QuoteRejected (with `check`)
    when verification fails, CollateralError when no collateral can be had.
    """
    raw = _quote_bytes(quote)
    now = _verification_time(at)
    parsed = _parse(raw)
    material = collateral.get(raw, at=now)
    try:
        report = dcap_qvl.verify(raw, material, now)
    except ValueError as exc:
        raise _failure(str(exc), material, now) from None
    return _claims(raw, parsed, report)


def _quote_bytes(quote: bytes) -> bytes:
    if not isinstance(quote, (bytes, bytearray, memoryview)):
        raise FormatError(f"a quote must be bytes, got {type(quote).__name__}")
    raw = bytes(quote)
    if len(raw) > MAX_QUOTE_SIZE:
        raise FormatError(f"quote is {len(raw)} bytes, more than the {MAX_QUOTE_SIZE} allowed")
    return raw


def _verification_time(at: int | None) -> int:
    if at is None:
        return int(time.time())
    if not is_int(at) or not 0 <= at < 2**63:
        raise UsageError(f"verification time must be a unix time in seconds, got {at!r}")
    return at


def _parse(raw: bytes) -> dcap_qvl.Quote:
    try:
        parsed = dcap_qvl.Quote.parse(raw)
    except ValueError as exc:
        detail = _clean(str(exc)).removeprefix("Failed to parse quote: ")
        raise FormatError(f"not a DCAP quote ({len(raw)} bytes): {detail}") from None
    version, tee_type = parsed.header.version, parsed.header.tee_type
    if tee_type == _TEE_SGX and version != 3:
        raise FormatError(f"SGX quote version {version} is not supported (expected 3)")
    if tee_type == _TEE_TDX and version not in (4, 5):
        raise FormatError(f"TDX quote version {version} is not supported (expected 4 or 5)")
    if tee_type not in (_TEE_SGX, _TEE_TDX):
        raise FormatError(f"quote TEE type {tee_type:#x} is neither SGX nor TDX")
    return parsed


def _claims(raw: bytes, parsed: dcap_qvl.Quote, report: dcap_qvl.VerifiedReport) -> Claims:
    body = parsed.report
    common = {
        "tcb_status": report.status,
        "advisory_ids": tuple(report.advisory_ids),
        "report_data": bytes(body.report_data),
    }
    if parsed.header.tee_type == _TEE_TDX:
        return Claims(
            tee=TeeType.TDX,
            mr_td=bytes(body.mr_td),
            rtmrs=tuple(bytes(r) for r in (body.rt_mr0, body.rt_mr1, body.rt_mr2, body.rt_mr3)),
            mr_seam=bytes(body.mr_seam),
            mr_signer_seam=bytes(body.mr_signer_seam),
            mr_config_id=bytes(body.mr_config_id),
            mr_owner=bytes(body.mr_owner),
            mr_owner_config=bytes(body.mr_owner_config),
            debug=bool(body.td_attributes[0] & _TD_ATTRIBUTES_DEBUG),
            **common,
        )
    isv_prod_id, isv_svn = struct.unpack_from("<HH", raw, _SGX_ISV_IDS)
    return Claims(
        tee=TeeType.SGX,
        mr_enclave=bytes(body.mr_enclave),
        mr_signer=bytes(body.mr_signer),
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        debug=bool(body.attributes[0] & _SGX_ATTRIBUTES_DEBUG),
        **common,
    )


def _failure(
    message: str, material: dcap_qvl.QuoteCollateralV3, at: int
) -> FormatError | QuoteRejected:
    """Map a dcap-qvl error message to a FormatError or a QuoteRejected with a check name."""
    detail = _clean(message).removeprefix("Verification failed: ")
    lower = detail.lower()
    if any(marker in lower for marker in _UNPARSEABLE):
        return FormatError(f"quote cannot be verified: {detail}")
    if any(marker in lower for marker in _TIME_FAILURES):
        return _time_failure(detail, material, at)
    for marker, check, meaning in _FAILURES:
        if marker in lower:
            return QuoteRejected(f"{meaning}: {detail}", check=check)
    return QuoteRejected(f"quote verification failed: {detail}", check=Check.VERIFICATION)


def _time_failure(detail: str, material: dcap_qvl.QuoteCollateralV3, at: int) -> QuoteRejected:
    try:
        validity = collateral_validity(material)
    except FormatError as exc:
        return QuoteRejected(f"{detail} ({exc})", check=Check.COLLATERAL_EXPIRED)
    if at >= validity.next_update:
        return QuoteRejected(
            f"collateral expired at {isotime(validity.next_update)}"
            f" ({validity.first_to_expire} nextUpdate; verification time {isotime(at)})",
            check=Check.COLLATERAL_EXPIRED,
        )
    if at < validity.issued_at:
        return QuoteRejected(
            f"collateral issued at {isotime(validity.issued_at)} is newer than the verification"
            f" time {isotime(at)}",
            check=Check.COLLATERAL_NOT_YET_VALID,
        )
    return QuoteRejected(
        f"certificate not valid at verification time {isotime(at)}: {detail}",
        check=Check.CERTIFICATE_EXPIRED,
    )


def _clean(message: str) -> str:
    """One line from anyhow's multi-line 'X\\n\\nCaused by:\\n    Y' messages."""
    text = re.sub(r"\s*Caused by:\s*", ": ", message)
    return re.sub(r"\s+", " ", text).strip()
