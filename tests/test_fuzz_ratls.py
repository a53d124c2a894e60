"""Fuzzing the certificate verifier: whatever the bytes, only enclavefl's typed errors escape."""

from __future__ import annotations

import base64
import hashlib

import cbor2
import pytest
from conftest import PINNED_TIME, fuzz_settings, sim_measurement
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from test_ratls import build_cert, spki_der

from enclavefl.errors import EnclaveflError, FormatError
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.claims import Claims
from enclavefl.tee.policy import Policy
from enclavefl.tee.ratls import (
    GRAMINE_LEGACY_QUOTE_OID,
    SIMULATED_EVIDENCE_CBOR_TAG,
    TCG_DICE_TAGGED_EVIDENCE_OID,
    TEE_QUOTE_CBOR_TAG,
    make_certificate,
    verify_certificate,
)
from enclavefl.tee.simulated import decode_cbor, parse_simulated_quote

MEASUREMENT = sim_measurement(b"fuzz")
POLICY = Policy.from_json({"sgx_mrs": [MEASUREMENT.to_json()], "allow_simulated": True})
IDENTITY = make_certificate(
    SimulatedAttester(MEASUREMENT), extra_claims={"policy-hash": POLICY.digest()}
)
EVIDENCE = IDENTITY.certificate.extensions.get_extension_for_oid(
    TCG_DICE_TAGGED_EVIDENCE_OID
).value.value
SPKI_HASH = hashlib.sha256(spki_der(IDENTITY.private_key.public_key())).digest()
KEY = ec.generate_private_key(ec.SECP384R1())
FUZZ = fuzz_settings(150)


def verify_or_typed_error(cert: bytes) -> Claims | EnclaveflError:
    try:
        return verify_certificate(cert, policy=POLICY)
    except EnclaveflError as exc:
        return exc


@FUZZ
@given(st.binary(max_size=3000))
def test_random_bytes_as_certificate(data):
    assert isinstance(verify_or_typed_error(data), EnclaveflError)


@FUZZ
@given(st.binary(max_size=3000))
def test_random_pem_body_as_certificate(data):
    pem = (
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(data) + b"-----END CERTIFICATE-----\n"
    )
    assert isinstance(verify_or_typed_error(pem), EnclaveflError)


@st.composite
def mutations(draw, original: bytes):
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


@FUZZ
@given(mutations(EVIDENCE))
def test_mutated_evidence_extension(evidence):
    result = verify_or_typed_error(
        build_cert(IDENTITY.private_key, {TCG_DICE_TAGGED_EVIDENCE_OID: evidence})
    )
    if isinstance(result, Claims):
        # A mutation may leave the evidence consistent (say, another isv_svn inside the
        # self-reported quote); it must then still name this very key.
        assert result.bound["pubkey-hash"] == [1, SPKI_HASH]
    else:
        assert isinstance(result, EnclaveflError)


@FUZZ
@given(mutations(IDENTITY.cert_der))
def test_mutated_certificate_bytes(cert):
    result = verify_or_typed_error(cert)
    assert isinstance(result, (Claims, EnclaveflError))


VERSION_AT = IDENTITY.cert_der.find(bytes([0xA0, 0x03, 0x02, 0x01, 0x02])) + 4


@FUZZ
@given(version=st.integers(0, 255), length=st.sampled_from([1, 2]))
def test_any_x509_version_is_refused_or_keeps_the_claims(version: int, length: int) -> None:
    der = IDENTITY.cert_der
    if length == 1:
        cert = der[:VERSION_AT] + bytes([version]) + der[VERSION_AT + 1 :]
    else:  # a two-byte INTEGER where one belongs: every length below it shifts
        cert = der[: VERSION_AT - 1] + bytes([2, 0, version]) + der[VERSION_AT + 1 :]
    result = verify_or_typed_error(cert)  # anything but a typed error escapes and fails
    if isinstance(result, Claims):
        assert result == verify_certificate(IDENTITY.cert_der, policy=POLICY)


@fuzz_settings(60)
@given(data=st.data())
def test_mutated_real_quote_in_legacy_extension(sgx_sample, data):
    quote, collateral = sgx_sample
    cert = build_cert(KEY, {GRAMINE_LEGACY_QUOTE_OID: data.draw(mutations(quote))})
    with pytest.raises(EnclaveflError):
        verify_certificate(cert, policy=Policy.default(), collateral=collateral, at=PINNED_TIME)


cbor_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.binary(max_size=80),
    st.text(max_size=20),
)
cbor_values = st.recursive(
    cbor_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=12), st.binary(max_size=4), st.integers()),
            children,
            max_size=4,
        ),
        st.builds(
            cbor2.CBORTag,
            st.sampled_from([0, 1, 2, 24, 258, TEE_QUOTE_CBOR_TAG, SIMULATED_EVIDENCE_CBOR_TAG]),
            children,
        ),
    ),
    max_leaves=12,
)
evidence_like = st.one_of(
    cbor_values,
    st.builds(
        lambda tag, quote, claims: cbor2.CBORTag(tag, [quote, claims]),
        st.sampled_from([TEE_QUOTE_CBOR_TAG, SIMULATED_EVIDENCE_CBOR_TAG]),
        st.one_of(st.binary(max_size=600), cbor_values.map(cbor2.dumps)),
        st.one_of(st.binary(max_size=80), cbor_values.map(cbor2.dumps)),
    ),
)


def dumps_or_none(value) -> bytes | None:
    try:
        return cbor2.dumps(value)
    except (cbor2.CBOREncodeError, ValueError, TypeError):
        return None  # not encodable (e.g. a semantic tag around the wrong type)


@FUZZ
@given(evidence_like)
def test_random_cbor_in_evidence_extension(value):
    encoded = dumps_or_none(value)
    if encoded is None:
        return
    result = verify_or_typed_error(build_cert(KEY, {TCG_DICE_TAGGED_EVIDENCE_OID: encoded}))
    assert isinstance(result, EnclaveflError)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=400), evidence_like.map(dumps_or_none).filter(lambda b: b is not None)
    )
)
def test_cbor_decoders_raise_only_typed_errors(data):
    for parse in (parse_simulated_quote, lambda d: decode_cbor(d, what="fuzz")):
        try:
            parse(data)
        except EnclaveflError as exc:
            assert exc.reason


@pytest.mark.parametrize("depth", [20, 200, 5000])
def test_deeply_nested_cbor_is_format_error(depth):
    nested = b"\x81" * depth + b"\x00"
    result = verify_or_typed_error(
        build_cert(KEY, {TCG_DICE_TAGGED_EVIDENCE_OID: b"\xd9\xea\x60" + nested})
    )
    assert isinstance(result, EnclaveflError)


def _patched(der: bytes, old: bytes, new: bytes) -> bytes:
    assert der.count(old) == 1 and len(old) == len(new)
    return der.replace(old, new)


def test_duplicate_extensions_are_format_errors():
    first, second = x509.ObjectIdentifier("1.2.3.4.5.6"), x509.ObjectIdentifier("1.2.3.4.5.7")
    der = build_cert(KEY, {first: b"x", second: b"y"})
    duplicated = _patched(der, bytes.fromhex("06052a03040507"), bytes.fromhex("06052a03040506"))
    result = verify_or_typed_error(duplicated)
    assert isinstance(result, FormatError) and "Duplicate" in result.reason


@pytest.mark.parametrize("tag", [0xA3, 0xA5, 0x83])
def test_unsupported_subject_alt_names_are_format_errors(tag):
    # x400Address / ediPartyName, which cryptography refuses with its own exception type.
    der = build_cert(
        KEY,
        {TCG_DICE_TAGGED_EVIDENCE_OID: EVIDENCE},
        san=x509.SubjectAlternativeName([x509.RegisteredID(x509.ObjectIdentifier("1.2.3"))]),
    )
    result = verify_or_typed_error(
        _patched(der, bytes.fromhex("88022a03"), bytes([tag]) + bytes.fromhex("022a03"))
    )
    assert isinstance(result, FormatError)
