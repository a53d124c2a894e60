"""Measurements: simulated (hash of the measured files) and read from a Gramine SIGSTRUCT."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import enclavefl
from enclavefl.errors import ConfigError, FormatError, UsageError
from enclavefl.tee.measure import (
    DEVELOPMENT_MR_SIGNER,
    SIGSTRUCT_SIZE,
    Measurement,
    mr_signer_of_key,
    read_sigstruct,
    simulated_measurement,
)

PACKAGE = Path(enclavefl.__file__).resolve().parent


@pytest.fixture(scope="module")
def rsa3072_key() -> rsa.RSAPrivateKey:
    # Gramine's enclave signing keys: RSA-3072, public exponent 3.
    return rsa.generate_private_key(public_exponent=3, key_size=3072)


@pytest.fixture
def package_copy(tmp_path) -> Path:
    copy = tmp_path / "site" / "enclavefl"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return copy


def test_editing_a_measured_file_changes_mr_enclave(package_copy):
    before = simulated_measurement(package_root=package_copy)
    target = package_copy / "tee" / "measure.py"
    original = target.read_bytes()

    target.write_bytes(original.replace(b"SIGSTRUCT", b"SIGSTRUCX", 1))  # same size, one byte
    edited = simulated_measurement(package_root=package_copy)
    target.write_bytes(original)
    restored = simulated_measurement(package_root=package_copy)

    assert edited.mr_enclave != before.mr_enclave
    assert restored.mr_enclave == before.mr_enclave
    assert edited.mr_signer == before.mr_signer == DEVELOPMENT_MR_SIGNER


def test_added_file_changes_mr_enclave_but_bytecode_does_not(package_copy):
    before = simulated_measurement(package_root=package_copy).mr_enclave
    cache = package_copy / "tee" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "ratls.cpython-311.pyc").write_bytes(b"bytecode")
    (package_copy / "stray.pyc").write_bytes(b"bytecode")
    assert simulated_measurement(package_root=package_copy).mr_enclave == before
    (package_copy / "tee" / "extra.py").write_text("x = 1\n")
    assert simulated_measurement(package_root=package_copy).mr_enclave != before


def test_renaming_a_measured_file_changes_mr_enclave(package_copy):
    before = simulated_measurement(package_root=package_copy).mr_enclave
    (package_copy / "tee" / "ratls.py").rename(package_copy / "tee" / "ratls2.py")
    assert simulated_measurement(package_root=package_copy).mr_enclave != before


def test_mr_enclave_does_not_depend_on_install_location(package_copy, tmp_path):
    elsewhere = tmp_path / "other" / "enclavefl"
    shutil.copytree(package_copy, elsewhere)
    assert (
        simulated_measurement(package_root=elsewhere).mr_enclave
        == simulated_measurement(package_root=package_copy).mr_enclave
    )


def test_job_file_is_measured(package_copy, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("rounds: 3\n")
    base = simulated_measurement(package_root=package_copy)
    with_job = simulated_measurement([job], package_root=package_copy)
    job.write_text("rounds: 4\n")
    edited_job = simulated_measurement([job], package_root=package_copy)
    assert len({base.mr_enclave, with_job.mr_enclave, edited_job.mr_enclave}) == 3

    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    (other_dir / "job.yaml").write_text("rounds: 4\n")
    # Identified by name and content, not by where the launcher keeps it.
    assert simulated_measurement([other_dir / "job.yaml"], package_root=package_copy) == edited_job


def test_extra_files_must_have_distinct_names(package_copy, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "job.yaml").write_text(d)
    with pytest.raises(UsageError, match=r"share the name 'job\.yaml'"):
        simulated_measurement(
            [tmp_path / "a" / "job.yaml", tmp_path / "b" / "job.yaml"], package_root=package_copy
        )


def test_missing_extra_file_is_usage_error(package_copy, tmp_path):
    with pytest.raises(UsageError, match=r"job\.yaml"):
        simulated_measurement([tmp_path / "job.yaml"], package_root=package_copy)


def test_installed_package_is_measured_by_default():
    measurement = simulated_measurement(isv_prod_id=5, isv_svn=2)
    assert len(measurement.mr_enclave) == 32
    assert (measurement.isv_prod_id, measurement.isv_svn) == (5, 2)
    seed = b"enclavefl simulated development signer"
    assert hashlib.sha256(seed).digest() == DEVELOPMENT_MR_SIGNER


def test_signing_key_sets_mr_signer(tmp_path, package_copy, rsa3072_key):
    private_pem = tmp_path / "enclave-key.pem"
    private_pem.write_bytes(
        rsa3072_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public_pem = tmp_path / "enclave-key.pub.pem"
    public_pem.write_bytes(
        rsa3072_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    expected = hashlib.sha256(
        rsa3072_key.public_key().public_numbers().n.to_bytes(384, "little")
    ).digest()

    measurement = simulated_measurement(signing_key=private_pem, package_root=package_copy)
    assert measurement.mr_signer == expected
    assert mr_signer_of_key(public_pem) == expected


def test_signing_key_must_be_rsa3072(tmp_path):
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="RSA-3072"):
        mr_signer_of_key(ec_pem)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError):
        mr_signer_of_key(garbage)
    with pytest.raises(UsageError, match="cannot read signing key"):
        mr_signer_of_key(tmp_path / "absent.pem")


# -- SIGSTRUCT ----------------------------------------------------------------------------


def assemble_sigstruct(
    modulus: bytes, enclave_hash: bytes, isv_prod_id: int, isv_svn: int
) -> bytes:
    """A SIGSTRUCT laid out field by field as the Intel SDM (vol. 3D, 38.13) defines it."""
    fields = [
        bytes.fromhex("06000000e10000000000010000000000"),  # HEADER           0
        struct.pack("<I", 0),                                # VENDOR          16
        struct.pack("<HBB", 2024, 5, 17),                    # DATE            20
        bytes.fromhex("01010000600000006000000001000000"),  # HEADER2         24
        struct.pack("<I", 0),                                # SWDEFINED       40
        bytes(84),                                           # RESERVED        44
        modulus,                                             # MODULUS        128
        struct.pack("<I", 3),                                # EXPONENT       512
        b"\x5a" * 384,                                       # SIGNATURE      516
        struct.pack("<I", 0),                                # MISCSELECT     900
        struct.pack("<I", 0xFFFFFFFF),                       # MISCMASK       904
        bytes(4),                                            # CET/RESERVED   908
        bytes(16),                                           # ISVFAMILYID    912
        bytes.fromhex("0400000000000000e700000000000000"),  # ATTRIBUTES     928
        bytes.fromhex("fdffffffffffffff1bffffffffffffff"),  # ATTRIBUTEMASK  944
        enclave_hash,                                        # ENCLAVEHASH    960
        bytes(16),                                           # RESERVED       992
        bytes(16),                                           # ISVEXTPRODID  1008
        struct.pack("<H", isv_prod_id),                      # ISVPRODID     1024
        struct.pack("<H", isv_svn),                          # ISVSVN        1026
        bytes(12),                                           # RESERVED      1028
        b"\xa1" * 384,                                       # Q1            1040
        b"\xa2" * 384,                                       # Q2            1424
    ]  # fmt: skip
    data = b"".join(fields)
    assert len(data) == SIGSTRUCT_SIZE == 1808
    return data


def test_read_sigstruct_of_assembled_sigstruct(tmp_path, rsa3072_key):
    modulus = rsa3072_key.public_key().public_numbers().n.to_bytes(384, "little")
    enclave_hash = hashlib.sha256(b"some enclave").digest()
    sig = tmp_path / "enclavefl.sig"
    sig.write_bytes(assemble_sigstruct(modulus, enclave_hash, isv_prod_id=0x1234, isv_svn=0x0102))

    measurement = read_sigstruct(sig)

    assert measurement == Measurement(
        enclave_hash, hashlib.sha256(modulus).digest(), 0x1234, 0x0102
    )
    # The same signer whether read from the .sig or computed from the key that signed it.
    key_pem = tmp_path / "key.pem"
    key_pem.write_bytes(
        rsa3072_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert measurement.mr_signer == mr_signer_of_key(key_pem)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d[:-1], "must be 1808 bytes"),
        (lambda d: d + b"\x00", "must be 1808 bytes"),
        (lambda d: b"\x07" + d[1:], "header"),
        (lambda d: d[:24] + b"\x02" + d[25:], "header2"),
    ],
)
def test_read_sigstruct_rejects_malformed(tmp_path, mutate, match):
    good = assemble_sigstruct(b"\x01" * 384, b"\x02" * 32, 1, 1)
    sig = tmp_path / "bad.sig"
    sig.write_bytes(mutate(good))
    with pytest.raises(FormatError, match=match):
        read_sigstruct(sig)


def test_read_sigstruct_missing_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read SIGSTRUCT"):
        read_sigstruct(tmp_path / "absent.sig")


def test_measurement_validates_and_serializes():
    measurement = Measurement(b"\xab" * 32, b"\xcd" * 32, isv_prod_id=1, isv_svn=65535)
    assert measurement.to_json() == {
        "mr_enclave": "ab" * 32,
        "mr_signer": "cd" * 32,
        "isv_prod_id": 1,
        "isv_svn": 65535,
    }
    with pytest.raises(UsageError):
        Measurement(b"\xab" * 31, b"\xcd" * 32)
    with pytest.raises(UsageError, match="isv_svn"):
        Measurement(b"\xab" * 32, b"\xcd" * 32, isv_svn=65536)
