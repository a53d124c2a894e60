"""RA-TLS certificates: simulated round trips, key binding, Gramine's layouts, real quotes."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, UTC
from typing import Any

import cbor2
import pytest
from conftest import PINNED_TIME, shared_file
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavefl.errors import (
    FormatError,
    KeyBindingRejected,
    PolicyRejected,
    QuoteRejected,
    Rejected,
    UsageError,
)
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.claims import TeeType
from enclavefl.tee.collateral import OfflineCollateral
from enclavefl.tee.measure import Measurement
from enclavefl.tee.policy import Policy
from enclavefl.tee.ratls import (
    GRAMINE_LEGACY_QUOTE_OID,
    SIMULATED_EVIDENCE_CBOR_TAG,
    TCG_DICE_TAGGED_EVIDENCE_OID,
    RaTlsIdentity,
    extract_evidence,
    make_certificate,
    verify_certificate,
)
from enclavefl.tee.simulated import encode_simulated_quote, parse_simulated_quote

MEASUREMENT = Measurement(
    hashlib.sha256(b"enclave").digest(), hashlib.sha256(b"signer").digest(), 3, 5
)
OTHER = Measurement(hashlib.sha256(b"other").digest(), MEASUREMENT.mr_signer, 3, 5)
SIM_POLICY = Policy.from_json({"sgx_mrs": [MEASUREMENT.to_json()], "allow_simulated": True})
SGX_MR_ENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


@pytest.fixture(scope="module")
def attester() -> SimulatedAttester:
    return SimulatedAttester(MEASUREMENT)


@pytest.fixture(scope="module")
def identity(attester) -> RaTlsIdentity:
    return make_certificate(
        attester, extra_claims={"policy-hash": SIM_POLICY.digest()}, common_name="ps.job-1"
    )


def spki_der(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def build_cert(
    key: ec.EllipticCurvePrivateKey,
    extensions: dict[x509.ObjectIdentifier, bytes],
    *,
    signer: ec.EllipticCurvePrivateKey | None = None,
    not_before: datetime = datetime(2020, 1, 1, tzinfo=UTC),
    not_after: datetime = datetime(2030, 12, 31, tzinfo=UTC),
    subject: str = "CN=RATLS,O=GramineDevelopers,C=US",
    san: x509.SubjectAlternativeName | None = None,
) -> bytes:
    """A self-signed certificate shaped like Gramine's, carrying the given raw extensions."""
    name = x509.Name.from_rfc4514_string(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    for oid, value in extensions.items():
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return builder.sign(signer or key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def simulated_evidence(quote: bytes, claims: bytes) -> bytes:
    """The tagged-evidence extension value under the simulated tag: CBOR tag ([quote, claims])."""
    return cbor2.dumps(cbor2.CBORTag(SIMULATED_EVIDENCE_CBOR_TAG, [quote, claims]))


def simulated_cert(key: ec.EllipticCurvePrivateKey, quote: bytes, claims: bytes, **options: Any) -> bytes:
    """A certificate for `key` whose tagged evidence is the simulated `quote` and `claims`."""
    return build_cert(key, {TCG_DICE_TAGGED_EVIDENCE_OID: simulated_evidence(quote, claims)}, **options)


def gramine_claims(key) -> bytes:
    """Claims exactly as Gramine's libcbor writes them (hand-assembled bytes)."""
    digest = hashlib.sha256(spki_der(key.public_key())).digest()
    hash_entry = b"\x82\x01\x58\x20" + digest  # array(2): uint 1, bstr(32)
    return b"\xa1\x6bpubkey-hash\x58" + bytes([len(hash_entry)]) + hash_entry


def gramine_evidence(quote: bytes, claims: bytes) -> bytes:
    """CBOR tag 60000 ([bstr quote, bstr claims]), hand-assembled as libcbor encodes it."""
    assert 256 <= len(quote) < 65536 and len(claims) < 256
    return (
        b"\xd9\xea\x60\x82"
        + b"\x59" + len(quote).to_bytes(2, "big") + quote
        + b"\x58" + bytes([len(claims)]) + claims
    )  # fmt: skip


# -- simulated round trip -----------------------------------------------------------------


def test_simulated_round_trip(identity):
    claims = verify_certificate(identity.cert_pem, policy=SIM_POLICY)

    assert claims.tee is TeeType.SIMULATED and claims.insecure
    assert claims.mr_enclave == MEASUREMENT.mr_enclave
    assert claims.bound["pubkey-hash"] == [
        1,
        hashlib.sha256(spki_der(identity.private_key.public_key())).digest(),
    ]
    assert claims.bound["policy-hash"] == SIM_POLICY.digest()
    assert claims.report_data[32:] == bytes(32)
    # DER bytes and parsed certificates verify the same.
    assert verify_certificate(identity.cert_der, policy=SIM_POLICY) == claims
    assert verify_certificate(identity.certificate, policy=SIM_POLICY) == claims


def test_certificate_shape(identity):
    cert = identity.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ps.job-1"
    assert cert.issuer == cert.subject
    assert cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == ["ps.job-1"]
    evidence_ext = cert.extensions.get_extension_for_oid(TCG_DICE_TAGGED_EVIDENCE_OID)
    assert evidence_ext.critical is False  # TLS stacks must not refuse an unknown extension
    assert isinstance(identity.private_key.curve, ec.SECP384R1)
    loaded = serialization.load_pem_private_key(identity.key_pem(), password=None)
    assert spki_der(loaded.public_key()) == spki_der(cert.public_key())


def test_identity_repr_hides_the_key(identity):
    text = repr(identity)
    assert "ps.job-1" in text
    assert "PRIVATE" not in text and "private_key" not in text
    assert str(identity.private_key.private_numbers().private_value) not in text


def test_evidence_layout_matches_gramine_byte_for_byte(identity):
    evidence = extract_evidence(identity.cert_der)
    assert evidence.tee is TeeType.SIMULATED and not evidence.legacy
    raw = identity.certificate.extensions.get_extension_for_oid(
        TCG_DICE_TAGGED_EVIDENCE_OID
    ).value.value
    # Same outer CBOR layout as Gramine, under the simulated tag.
    assert raw == simulated_evidence(evidence.quote, evidence.claims)
    claims = cbor2.loads(evidence.claims)
    assert list(claims) == ["pubkey-hash", "policy-hash"]
    # Gramine's one-entry map, with the extra claim appended: map(2) instead of map(1).
    gramine = gramine_claims(identity.private_key)
    assert evidence.claims == b"\xa2" + gramine[1:] + cbor2.dumps("policy-hash") + cbor2.dumps(
        SIM_POLICY.digest()
    )
    # report_data = SHA-256(serialized claims) || zeros
    quote_claims = parse_simulated_quote(evidence.quote)
    assert quote_claims.report_data == hashlib.sha256(evidence.claims).digest() + bytes(32)


def test_hardware_certificate_layout_is_gramines(tmp_path):
    sgx_quote = shared_file("attestation", "sgx_quote").read_bytes()

    class ReplayAttester:  # returns a recorded hardware quote, whatever the report data
        tee = TeeType.SGX

        def quote(self, report_data: bytes) -> bytes:
            assert len(report_data) == 64
            return sgx_quote

    identity = make_certificate(ReplayAttester())
    raw = identity.certificate.extensions.get_extension_for_oid(
        TCG_DICE_TAGGED_EVIDENCE_OID
    ).value.value
    assert raw == gramine_evidence(sgx_quote, gramine_claims(identity.private_key))
    evidence = extract_evidence(identity.cert_pem)
    assert (evidence.tee, evidence.quote, evidence.legacy) == (TeeType.SGX, sgx_quote, False)


# -- rejections ---------------------------------------------------------------------------


def test_simulated_evidence_needs_policy_opt_in(identity):
    with pytest.raises(PolicyRejected) as err:
        verify_certificate(
            identity.cert_der, policy=Policy.from_json({"sgx_mrs": [MEASUREMENT.to_json()]})
        )
    assert err.value.check == "simulated"
    with pytest.raises(PolicyRejected) as err:
        verify_certificate(identity.cert_der, policy=Policy.default())
    assert err.value.check == "simulated"


def test_simulated_identity_is_still_checked(identity):
    policy = Policy.from_json({"sgx_mrs": [OTHER.to_json()], "allow_simulated": True})
    with pytest.raises(PolicyRejected) as err:
        verify_certificate(identity.cert_der, policy=policy)
    assert err.value.check == "mr_enclave"


def test_evidence_bound_to_another_key_is_rejected(identity):
    # Replay: copy a valid evidence extension into a certificate for a key the attacker holds.
    stolen = identity.certificate.extensions.get_extension_for_oid(
        TCG_DICE_TAGGED_EVIDENCE_OID
    ).value.value
    attacker = ec.generate_private_key(ec.SECP384R1())
    forged = build_cert(attacker, {TCG_DICE_TAGGED_EVIDENCE_OID: stolen})
    with pytest.raises(KeyBindingRejected) as err:
        verify_certificate(forged, policy=SIM_POLICY)
    assert err.value.check == "key-binding"
    assert "bound to another key" in err.value.reason


def test_claims_not_matching_report_data_are_rejected(attester):
    key = ec.generate_private_key(ec.SECP384R1())
    claims = gramine_claims(key)
    quote = attester.quote(hashlib.sha256(claims + b"x").digest() + bytes(32))
    cert = simulated_cert(key, quote, claims)
    with pytest.raises(KeyBindingRejected) as err:
        verify_certificate(cert, policy=SIM_POLICY)
    assert err.value.check == "key-binding"
    assert "not bound to its claims" in err.value.reason


def test_claims_without_pubkey_hash_are_rejected(attester):
    key = ec.generate_private_key(ec.SECP384R1())
    claims = cbor2.dumps({"nonce": b"1234"})
    quote = attester.quote(hashlib.sha256(claims).digest() + bytes(32))
    cert = simulated_cert(key, quote, claims)
    with pytest.raises(KeyBindingRejected) as err:
        verify_certificate(cert, policy=SIM_POLICY)
    assert err.value.check == "key-binding"


@pytest.mark.parametrize(("alg", "hash_fn"), [(7, hashlib.sha384), (8, hashlib.sha512)])
def test_other_pubkey_hash_algorithms_are_read(attester, alg, hash_fn):
    key = ec.generate_private_key(ec.SECP384R1())
    entry = cbor2.dumps([alg, hash_fn(spki_der(key.public_key())).digest()])
    claims = cbor2.dumps({"pubkey-hash": entry})
    quote = attester.quote(hashlib.sha256(claims).digest() + bytes(32))
    cert = simulated_cert(key, quote, claims)
    assert verify_certificate(cert, policy=SIM_POLICY).bound["pubkey-hash"][0] == alg


def test_certificate_signed_by_another_key_is_rejected(attester):
    key = ec.generate_private_key(ec.SECP384R1())
    claims = gramine_claims(key)
    quote = attester.quote(hashlib.sha256(claims).digest() + bytes(32))
    good = simulated_cert(key, quote, claims)
    assert verify_certificate(good, policy=SIM_POLICY).mr_enclave == MEASUREMENT.mr_enclave

    forged = simulated_cert(key, quote, claims, signer=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(KeyBindingRejected) as err:
        verify_certificate(forged, policy=SIM_POLICY)
    assert err.value.check == "self-signature"


def test_certificate_validity_is_checked_at_the_given_time(identity):
    cert = identity.certificate
    inside = int(cert.not_valid_before_utc.timestamp()) + 3600
    assert verify_certificate(cert, policy=SIM_POLICY, at=inside).tee is TeeType.SIMULATED
    for outside in (
        int(cert.not_valid_after_utc.timestamp()) + 1,
        int(cert.not_valid_before_utc.timestamp()) - 1,
    ):
        with pytest.raises(Rejected) as err:
            verify_certificate(cert, policy=SIM_POLICY, at=outside)
        assert err.value.check == "certificate-validity"


def test_valid_for_sets_expiry(attester):
    identity = make_certificate(attester, valid_for=timedelta(hours=1))
    lifetime = identity.certificate.not_valid_after_utc - identity.certificate.not_valid_before_utc
    assert timedelta(hours=1) <= lifetime <= timedelta(hours=1, minutes=10)


def test_certificate_without_evidence_is_format_error():
    plain = build_cert(ec.generate_private_key(ec.SECP384R1()), {})
    with pytest.raises(FormatError, match="no RA-TLS evidence"):
        verify_certificate(plain, policy=SIM_POLICY)


def test_extra_claims_are_validated(attester):
    with pytest.raises(UsageError, match="pubkey-hash"):
        make_certificate(attester, extra_claims={"pubkey-hash": b"x"})
    with pytest.raises(UsageError):
        make_certificate(attester, extra_claims={"when": datetime.now(UTC)})
    with pytest.raises(UsageError):
        make_certificate(attester, extra_claims={"": b"x"})


def test_hardware_quote_needs_collateral():
    sgx_quote = shared_file("attestation", "sgx_quote").read_bytes()
    key = ec.generate_private_key(ec.SECP384R1())
    cert = build_cert(
        key, {TCG_DICE_TAGGED_EVIDENCE_OID: gramine_evidence(sgx_quote, gramine_claims(key))}
    )
    with pytest.raises(UsageError, match="collateral source is needed"):
        verify_certificate(cert, policy=Policy.default())


# -- real hardware evidence ---------------------------------------------------------------


def test_real_sgx_quote_in_tagged_layout_reaches_key_binding(sgx_sample):
    quote, collateral = sgx_sample
    key = ec.generate_private_key(ec.SECP384R1())
    cert = build_cert(
        key, {TCG_DICE_TAGGED_EVIDENCE_OID: gramine_evidence(quote, gramine_claims(key))}
    )
    policy = Policy.from_json({"sgx_mrs": [{"mr_enclave": SGX_MR_ENCLAVE}]})

    # The quote verifies (Intel chain, collateral at PINNED_TIME); its report_data is
    # "Hello, world!", not the hash of these claims, so the binding check refuses it.
    with pytest.raises(KeyBindingRejected) as err:
        verify_certificate(cert, policy=policy, collateral=collateral, at=PINNED_TIME)
    assert err.value.check == "key-binding"
    assert b"Hello, world!".hex() in err.value.reason


def test_real_sgx_quote_is_verified_before_key_binding(sgx_sample):
    quote, collateral = sgx_sample
    tampered = bytearray(quote)
    tampered[48 + 64] ^= 0x01  # a byte of mr_enclave in the signed report body
    key = ec.generate_private_key(ec.SECP384R1())
    cert = build_cert(
        key, {TCG_DICE_TAGGED_EVIDENCE_OID: gramine_evidence(bytes(tampered), gramine_claims(key))}
    )
    with pytest.raises(QuoteRejected):
        verify_certificate(cert, policy=Policy.default(), collateral=collateral, at=PINNED_TIME)


def test_real_sgx_quote_in_legacy_layout_reaches_key_binding(sgx_sample):
    quote, collateral = sgx_sample
    cert = build_cert(ec.generate_private_key(ec.SECP384R1()), {GRAMINE_LEGACY_QUOTE_OID: quote})
    # Gramine writes the OID's own DER TLV as its content: 06 0B | 06 09 2A 86 48 86 F8 4D 8A 39 06.
    assert bytes.fromhex("060b06092a864886f84d8a3906") in cert
    evidence = extract_evidence(cert)
    assert (evidence.tee, evidence.legacy, evidence.claims, evidence.quote) == (
        TeeType.SGX,
        True,
        None,
        quote,
    )
    with pytest.raises(KeyBindingRejected) as err:
        verify_certificate(cert, policy=Policy.default(), collateral=collateral, at=PINNED_TIME)
    assert err.value.check == "key-binding"
    assert "legacy" in err.value.reason


def test_tagged_extension_takes_precedence_over_legacy(sgx_sample):
    # Gramine >= 1.8 certificates carry both; like Gramine, the tagged one decides.
    quote, collateral = sgx_sample
    key = ec.generate_private_key(ec.SECP384R1())
    cert = build_cert(
        key,
        {
            GRAMINE_LEGACY_QUOTE_OID: quote,
            TCG_DICE_TAGGED_EVIDENCE_OID: gramine_evidence(quote, gramine_claims(key)),
        },
    )
    evidence = extract_evidence(cert)
    assert not evidence.legacy and evidence.claims == gramine_claims(key)
    with pytest.raises(KeyBindingRejected, match="not bound to its claims"):
        verify_certificate(cert, policy=Policy.default(), collateral=collateral, at=PINNED_TIME)


def test_real_tdx_quote_in_tagged_layout_reaches_key_binding():
    quote = shared_file("attestation", "tdx_quote").read_bytes()
    collateral = OfflineCollateral(shared_file("attestation", "tdx_quote_collateral.json"))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = build_cert(
        key, {TCG_DICE_TAGGED_EVIDENCE_OID: gramine_evidence(quote, gramine_claims(key))}
    )
    assert extract_evidence(cert).tee is TeeType.TDX
    with pytest.raises(KeyBindingRejected) as err:
        verify_certificate(cert, policy=Policy.default(), collateral=collateral, at=PINNED_TIME)
    assert err.value.check == "key-binding"


def test_simulated_quote_under_the_hardware_tag_is_not_a_quote(attester):
    key = ec.generate_private_key(ec.SECP384R1())
    claims = gramine_claims(key)
    sim = encode_simulated_quote(MEASUREMENT, hashlib.sha256(claims).digest() + bytes(32))
    cert = build_cert(
        key, {TCG_DICE_TAGGED_EVIDENCE_OID: cbor2.dumps(cbor2.CBORTag(60000, [sim, claims]))}
    )
    with pytest.raises(FormatError):
        verify_certificate(
            cert,
            policy=SIM_POLICY,
            collateral=OfflineCollateral(shared_file("attestation", "sgx_quote_collateral.json")),
        )


@pytest.mark.parametrize("at", [-1, True, 1.5, "1751328000", 10**12])
def test_verification_time_must_be_unix_seconds(identity, at):
    with pytest.raises(UsageError, match="unix time"):
        verify_certificate(identity.cert_der, policy=SIM_POLICY, at=at)


def with_x509_version(der: bytes, version: int) -> bytes:
    """The certificate with its version field ([0] EXPLICIT INTEGER 2 = v3) set to `version`."""
    at = der.find(bytes([0xA0, 0x03, 0x02, 0x01, 0x02]))
    assert at > 0
    return der[: at + 4] + bytes([version]) + der[at + 5 :]


@pytest.mark.parametrize("version", [3, 7, 0x7F])
def test_invalid_x509_version_is_format_error(identity: RaTlsIdentity, version: int) -> None:
    bad = with_x509_version(identity.cert_der, version)
    with pytest.raises(FormatError, match="not a valid X509 version"):
        verify_certificate(bad, policy=SIM_POLICY)
    pem = b"-----BEGIN CERTIFICATE-----\n" + __import__("base64").encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    with pytest.raises(FormatError, match="not a valid X509 version"):
        extract_evidence(pem)
