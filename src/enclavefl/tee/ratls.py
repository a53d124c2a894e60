"""RA-TLS certificates: a self-signed X.509 certificate whose key is bound to TEE evidence.

Layout (Gramine RA-TLS since v1.8, tools/sgx/ra-tls/ra_tls_attest.c, byte for byte):
  * the key is a fresh EC P-384 key made inside the TEE;
  * claims = CBOR map {"pubkey-hash": bstr(CBOR [1, SHA-256(DER SubjectPublicKeyInfo)]), ...}
    (1 = SHA-256 in the IANA named-information registry; 7 and 8, SHA-384/512, are read too);
  * the quote's report_data = SHA-256(serialized claims) || 32 zero bytes;
  * extension 2.23.133.5.4.9 (TCG DICE tagged evidence, non-critical) holds
    CBOR tag 60000 ( [ bstr quote, bstr serialized claims ] ).
Simulated evidence uses the same layout under SIMULATED_EVIDENCE_CBOR_TAG, so it can never
be mistaken for a hardware quote. Extra claims (e.g. "policy-hash") ride in the same map.

Certificates made by Gramine before v1.8 carry only the legacy extension (the OID bytes
Gramine writes decode as 0.6.9.42.840.113741.1337.6) with the raw quote, bound as
report_data[0:32] = SHA-256(DER SubjectPublicKeyInfo); they are read too.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from typing import TYPE_CHECKING, Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from enclavefl.errors import Check, FormatError, KeyBindingRejected, PolicyRejected, Rejected, UsageError
from enclavefl.tee.attesters import Attester
from enclavefl.tee.claims import Claims, TeeType
from enclavefl.tee.quote import verify_quote
from enclavefl.tee.simulated import REPORT_DATA_SIZE, decode_cbor, parse_simulated_quote
from enclavefl.validate import is_int

__all__ = [
    "Evidence",
    "GRAMINE_LEGACY_QUOTE_OID",
    "PUBKEY_HASH_CLAIM",
    "RaTlsIdentity",
    "SERVER_NAME",
    "SIMULATED_EVIDENCE_CBOR_TAG",
    "TCG_DICE_TAGGED_EVIDENCE_OID",
    "TEE_QUOTE_CBOR_TAG",
    "certificate_public_key",
    "extract_evidence",
    "load_certificate",
    "make_certificate",
    "verify_certificate",
]

if TYPE_CHECKING:
    from enclavefl.tee.collateral import CollateralSource
    from enclavefl.tee.policy import Policy

TCG_DICE_TAGGED_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")
# Gramine's NON_STANDARD_INTEL_SGX_QUOTE_OID: it passes the full DER TLV (06 09 2A 86 48 86
# F8 4D 8A 39 06) where the content octets belong, so the OID in the certificate is this one.
GRAMINE_LEGACY_QUOTE_OID = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
TEE_QUOTE_CBOR_TAG = 60000  # TCG_DICE_TAGGED_EVIDENCE_TEE_QUOTE_CBOR_TAG in Gramine
# Our own, unregistered tag ("enfs" in ASCII) for simulated evidence: no other RA-TLS
# implementation will ever read a simulated quote as hardware evidence.
SIMULATED_EVIDENCE_CBOR_TAG = 0x656E6673
PUBKEY_HASH_CLAIM = "pubkey-hash"
# The TLS server name of every enclavefl party certificate (CN and DNS subjectAltName).
# Clients ask for this name (SNI), not for the host they dial: the certificate is pinned by
# its attested key, never by a DNS name, and asking for another name makes gRPC servers log
# "No match found for server name".
SERVER_NAME = "enclavefl"

_HASH_ALGS = {1: hashlib.sha256, 7: hashlib.sha384, 8: hashlib.sha512}  # IANA named-information
_QUOTE_HEADER_SIZE = 48
_TDX_TEE_TYPE = 0x81
_MAX_UNIX_TIME = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can hold


@dataclass(frozen=True, eq=False, repr=False)
class RaTlsIdentity:
    """This party's RA-TLS key and certificate. The private key is secret: never log it."""

    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def cert_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """SECRET: the private key as unencrypted PKCS#8 PEM, for handing to the TLS stack."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        fingerprint = hashlib.sha256(self.cert_der).hexdigest()[:16]
        subject = self.certificate.subject.rfc4514_string()
        return f"RaTlsIdentity(subject={subject!r}, sha256={fingerprint}…)"


@dataclass(frozen=True)
class Evidence:
    """The evidence a certificate carries, parsed but not yet verified."""

    tee: TeeType  # from the CBOR tag / quote header: a hint until the quote is verified
    quote: bytes
    claims: bytes | None  # serialized CBOR claims; None for the legacy layout
    legacy: bool


def make_certificate(
    attester: Attester,
    *,
    extra_claims: Mapping[str, Any] | None = None,
    common_name: str = SERVER_NAME,
    valid_for: timedelta = timedelta(days=7),
) -> RaTlsIdentity:
    """Make a fresh EC P-384 key and a self-signed certificate binding it to a new quote.

    CN and the DNS subjectAltName are `common_name` (the TLS target name peers expect).
    `extra_claims` are bound next to the key hash (string keys; bytes, str, int, bool, None,
    lists and maps of those).
    """
    private_key = ec.generate_private_key(ec.SECP384R1())
    spki = _spki_der(private_key.public_key())
    claims = _serialize_claims(spki, extra_claims or {})
    report_data = hashlib.sha256(claims).digest() + bytes(REPORT_DATA_SIZE - 32)
    quote = attester.quote(report_data)
    tag = SIMULATED_EVIDENCE_CBOR_TAG if attester.tee is TeeType.SIMULATED else TEE_QUOTE_CBOR_TAG
    evidence = cbor2.dumps(cbor2.CBORTag(tag, [quote, claims]))

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    public_key = private_key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))  # tolerate peers' clock skew
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .add_extension(
            x509.UnrecognizedExtension(TCG_DICE_TAGGED_EVIDENCE_OID, evidence), critical=False
        )
        .sign(private_key, hashes.SHA384())
    )
    return RaTlsIdentity(private_key, certificate)


def extract_evidence(cert: bytes | x509.Certificate) -> Evidence:
    """The evidence in an RA-TLS certificate (PEM or DER); FormatError if there is none."""
    certificate = load_certificate(cert)
    tagged = _extension_value(certificate, TCG_DICE_TAGGED_EVIDENCE_OID)
    if tagged is not None:
        # Like Gramine: when the tagged extension is present it alone decides.
        return _parse_tagged_evidence(tagged)
    legacy = _extension_value(certificate, GRAMINE_LEGACY_QUOTE_OID)
    if legacy is not None:
        return Evidence(tee=_quote_tee(legacy), quote=legacy, claims=None, legacy=True)
    raise FormatError(
        "certificate carries no RA-TLS evidence (no extension "
        f"{TCG_DICE_TAGGED_EVIDENCE_OID.dotted_string} or {GRAMINE_LEGACY_QUOTE_OID.dotted_string})"
    )


def verify_certificate(
    cert: bytes | x509.Certificate,
    *,
    policy: Policy,
    collateral: CollateralSource | None = None,
    at: int | None = None,
) -> Claims:
    """Verify an RA-TLS certificate and return the claims of its evidence.

    In order: the evidence (hardware quotes against `collateral`, at unix time `at`), the
    binding of the certificate's key to it, the certificate's self-signature and validity
    at `at`, then `policy`. The returned Claims' `bound` is the decoded claims map, with
    "pubkey-hash" as [hash-alg-id, digest].
    """
    if at is not None and (
        not is_int(at) or not 0 <= at <= _MAX_UNIX_TIME
    ):
        raise UsageError(f"verification time must be a unix time in seconds, got {at!r}")
    certificate = load_certificate(cert)
    evidence = extract_evidence(certificate)
    if evidence.tee is TeeType.SIMULATED:
        claims = parse_simulated_quote(evidence.quote)
    elif collateral is None:
        raise UsageError(
            f"the certificate carries a hardware {evidence.tee.value} quote: "
            "a collateral source is needed"
        )
    else:
        claims = verify_quote(evidence.quote, collateral, at=at)

    spki = _spki_der(certificate_public_key(certificate))
    bound = _check_key_binding(evidence, claims.report_data, spki)
    _check_self_signed(certificate, at)
    claims = dataclasses.replace(claims, bound=bound)
    try:
        policy.check(claims)
    except PolicyRejected as err:
        err.claims = claims
        raise
    return claims


def _serialize_claims(spki: bytes, extra_claims: Mapping[str, Any]) -> bytes:
    if PUBKEY_HASH_CLAIM in extra_claims:
        raise UsageError(f"extra_claims may not set {PUBKEY_HASH_CLAIM!r}: it is the key binding")
    if not all(isinstance(key, str) and key for key in extra_claims):
        raise UsageError("extra_claims keys must be non-empty strings")
    hash_entry = cbor2.dumps([1, hashlib.sha256(spki).digest()])
    try:
        claims = cbor2.dumps({PUBKEY_HASH_CLAIM: hash_entry, **extra_claims})
        decode_cbor(claims, what="claims")  # what we sign must be what verifiers accept
    except (cbor2.CBOREncodeError, FormatError) as exc:
        raise UsageError(f"extra_claims cannot be bound: {exc}") from exc
    return claims


def _parse_tagged_evidence(value: bytes) -> Evidence:
    item = decode_cbor(value, what="RA-TLS evidence")
    if not isinstance(item, cbor2.CBORTag) or item.tag not in (
        TEE_QUOTE_CBOR_TAG,
        SIMULATED_EVIDENCE_CBOR_TAG,
    ):
        raise FormatError(
            f"RA-TLS evidence must be CBOR tag {TEE_QUOTE_CBOR_TAG} "
            f"(or {SIMULATED_EVIDENCE_CBOR_TAG} for simulated evidence)"
        )
    body = item.value
    if not (
        isinstance(body, list) and len(body) == 2 and all(isinstance(part, bytes) for part in body)
    ):
        raise FormatError("RA-TLS evidence must be an array [bstr quote, bstr claims]")
    quote, claims = body
    if not claims:
        raise FormatError("RA-TLS evidence has empty claims")
    if item.tag == SIMULATED_EVIDENCE_CBOR_TAG:
        return Evidence(tee=TeeType.SIMULATED, quote=quote, claims=claims, legacy=False)
    return Evidence(tee=_quote_tee(quote), quote=quote, claims=claims, legacy=False)


def _quote_tee(quote: bytes) -> TeeType:
    if len(quote) < _QUOTE_HEADER_SIZE:
        raise FormatError(
            f"quote is {len(quote)} bytes, shorter than a quote header ({_QUOTE_HEADER_SIZE})"
        )
    tee_type = int.from_bytes(quote[4:8], "little")
    if tee_type == 0:
        return TeeType.SGX
    if tee_type == _TDX_TEE_TYPE:
        return TeeType.TDX
    raise FormatError(f"quote header has unknown tee_type {tee_type:#x}")


def _check_key_binding(evidence: Evidence, report_data: bytes, spki: bytes) -> dict[str, Any]:
    spki_hash = hashlib.sha256(spki).digest()
    if evidence.claims is None:  # legacy layout: the key hash is the report data itself
        if report_data[:32] != spki_hash:
            raise KeyBindingRejected(
                "legacy evidence is bound to another key: report_data[0:32] is "
                f"{report_data[:32].hex()}, SHA-256 of this certificate's key is {spki_hash.hex()}",
                check=Check.KEY_BINDING,
            )
        return {}
    claims_hash = hashlib.sha256(evidence.claims).digest()
    if report_data[:32] != claims_hash:
        raise KeyBindingRejected(
            f"evidence is not bound to its claims: report_data[0:32] is {report_data[:32].hex()}, "
            f"SHA-256 of the claims is {claims_hash.hex()}",
            check=Check.KEY_BINDING,
        )
    claims = decode_cbor(evidence.claims, what="RA-TLS claims")
    if not isinstance(claims, dict) or not all(isinstance(key, str) and key for key in claims):
        raise FormatError("RA-TLS claims must be a CBOR map with non-empty text keys")
    if PUBKEY_HASH_CLAIM not in claims:
        raise KeyBindingRejected(
            f"RA-TLS claims have no {PUBKEY_HASH_CLAIM!r}", check=Check.KEY_BINDING
        )
    alg, digest = _parse_hash_entry(claims[PUBKEY_HASH_CLAIM])
    expected = _HASH_ALGS[alg](spki).digest()
    if digest != expected:
        raise KeyBindingRejected(
            f"evidence is bound to another key: {PUBKEY_HASH_CLAIM} is {digest.hex()}, "
            f"this certificate's key hashes to {expected.hex()}",
            check=Check.KEY_BINDING,
        )
    return {**claims, PUBKEY_HASH_CLAIM: [alg, digest]}


def _parse_hash_entry(value: Any) -> tuple[int, bytes]:
    if not isinstance(value, bytes):
        raise FormatError(f"{PUBKEY_HASH_CLAIM} must be a bstr holding a CBOR hash-entry")
    entry = decode_cbor(value, what=PUBKEY_HASH_CLAIM)
    if not (
        isinstance(entry, list)
        and len(entry) == 2
        and type(entry[0]) is int
        and isinstance(entry[1], bytes)
    ):
        raise FormatError(f"{PUBKEY_HASH_CLAIM} must be [hash-alg-id, bstr digest]")
    alg, digest = entry
    if alg not in _HASH_ALGS:
        raise FormatError(
            f"{PUBKEY_HASH_CLAIM} uses hash-alg-id {alg}; supported: {sorted(_HASH_ALGS)}"
        )
    if len(digest) != _HASH_ALGS[alg]().digest_size:
        raise FormatError(
            f"{PUBKEY_HASH_CLAIM} digest is {len(digest)} bytes, wrong for hash-alg-id {alg}"
        )
    return alg, digest


def _check_self_signed(certificate: x509.Certificate, at: int | None) -> None:
    try:
        certificate.verify_directly_issued_by(certificate)
    except InvalidSignature as exc:
        raise KeyBindingRejected(
            "certificate signature does not verify with its own (evidence-bound) key",
            check=Check.SELF_SIGNATURE,
        ) from exc
    except ValueError as exc:  # issuer name differs from subject, or a bad signature encoding
        raise KeyBindingRejected(
            f"certificate is not self-signed by its key: {exc}", check=Check.SELF_SIGNATURE
        ) from exc
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise FormatError(f"certificate signature algorithm is not supported: {exc}") from exc
    when = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    try:
        not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    except ValueError as exc:
        raise FormatError(f"certificate validity does not parse: {exc}") from exc
    if not not_before <= when <= not_after:
        raise Rejected(
            f"certificate is not valid at {when.isoformat()}: "
            f"valid {not_before.isoformat()} to {not_after.isoformat()}",
            check=Check.CERTIFICATE_VALIDITY,
        )


def load_certificate(cert: bytes | x509.Certificate) -> x509.Certificate:
    """A certificate from PEM or DER bytes; FormatError for anything that is not one."""
    if isinstance(cert, x509.Certificate):
        return cert
    if not isinstance(cert, (bytes, bytearray)):
        raise FormatError(f"certificate must be PEM or DER bytes, got {type(cert).__name__}")
    try:
        if bytes(cert).lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(bytes(cert))
        return x509.load_der_x509_certificate(bytes(cert))
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise FormatError(f"not an X.509 certificate: {exc}") from exc


def _extension_value(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        extension = certificate.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise FormatError(f"certificate extensions do not parse: {exc}") from exc
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise FormatError(f"extension {oid.dotted_string} has an unexpected type")
    return value.value


def certificate_public_key(certificate: x509.Certificate) -> CertificatePublicKeyTypes:
    """The certificate's public key; FormatError when it does not parse."""
    try:
        return certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise FormatError(f"certificate public key does not parse: {exc}") from exc


def _spki_der(public_key: CertificatePublicKeyTypes) -> bytes:
    try:
        return public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise FormatError(f"certificate public key cannot be encoded: {exc}") from exc
