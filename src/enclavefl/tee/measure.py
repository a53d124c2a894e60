"""Enclave measurements: read them from a Gramine SIGSTRUCT, or compute the simulated ones.

In simulation nothing measures the code for us, so we compute what Gramine would: a hash
over every file the enclave loads (the enclavefl package and the job file). Editing any of
them changes `mr_enclave`, so policy checks stay meaningful in simulation. Simulated
measurements are still self-reported: they prove nothing to a remote party.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclavefl.errors import ConfigError, FormatError, UsageError

__all__ = [
    "DEVELOPMENT_MR_SIGNER",
    "SIGSTRUCT_SIZE",
    "Measurement",
    "mr_signer_of_key",
    "read_sigstruct",
    "simulated_measurement",
]

# A fixed, public signer identity for simulation when no signing key is given. It is not a
# key and nobody holds a secret for it: it only names "unsigned development build".
DEVELOPMENT_SIGNER_SEED = b"enclavefl simulated development signer"
DEVELOPMENT_MR_SIGNER = hashlib.sha256(DEVELOPMENT_SIGNER_SEED).digest()

# Gramine signs enclaves with RSA-3072 (exponent 3); SIGSTRUCT holds a 384-byte modulus.
_MODULUS_SIZE = 384

# Intel SIGSTRUCT layout (Intel SDM vol. 3D, "Enclave Signature Structure"; the same offsets
# as Gramine's sgx_arch_enclave_css_t). All integers are little-endian.
SIGSTRUCT_SIZE = 1808
_HEADER = bytes.fromhex("06000000e10000000000010000000000")
_HEADER2 = bytes.fromhex("01010000600000006000000001000000")
_OFF_HEADER = 0
_OFF_HEADER2 = 24
_OFF_MODULUS = 128
_OFF_ENCLAVE_HASH = 960
_OFF_ISV_PROD_ID = 1024
_OFF_ISV_SVN = 1026


@dataclass(frozen=True)
class Measurement:
    """The SGX identity of an enclave build."""

    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int = 0
    isv_svn: int = 0

    def __post_init__(self) -> None:
        if len(self.mr_enclave) != 32 or len(self.mr_signer) != 32:
            raise UsageError("mr_enclave and mr_signer must be 32 bytes each")
        for name in ("isv_prod_id", "isv_svn"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFF:
                raise UsageError(f"{name} must be in 0..65535, got {value}")

    def to_json(self) -> dict[str, Any]:
        """The measurement as a `sgx_mrs` policy entry."""
        return {
            "mr_enclave": self.mr_enclave.hex(),
            "mr_signer": self.mr_signer.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
        }


def read_sigstruct(path: Path) -> Measurement:
    """Read the measurement from a Gramine `.sig` file (an Intel SIGSTRUCT)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read SIGSTRUCT {path}: {exc.strerror or exc}") from exc
    if len(data) != SIGSTRUCT_SIZE:
        raise FormatError(f"{path}: SIGSTRUCT must be {SIGSTRUCT_SIZE} bytes, got {len(data)}")
    if data[_OFF_HEADER : _OFF_HEADER + 16] != _HEADER:
        raise FormatError(f"{path}: not a SIGSTRUCT (header is {data[:16].hex()})")
    if data[_OFF_HEADER2 : _OFF_HEADER2 + 16] != _HEADER2:
        raise FormatError(f"{path}: not a SIGSTRUCT (header2 is {data[24:40].hex()})")
    modulus = data[_OFF_MODULUS : _OFF_MODULUS + _MODULUS_SIZE]
    (isv_prod_id,) = struct.unpack_from("<H", data, _OFF_ISV_PROD_ID)
    (isv_svn,) = struct.unpack_from("<H", data, _OFF_ISV_SVN)
    return Measurement(
        mr_enclave=data[_OFF_ENCLAVE_HASH : _OFF_ENCLAVE_HASH + 32],
        mr_signer=hashlib.sha256(modulus).digest(),
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
    )


def mr_signer_of_key(path: Path) -> bytes:
    """MRSIGNER of an RSA-3072 signing key (PEM, private or public).

    As SGX computes it: SHA-256 of the modulus as 384 little-endian bytes.
    """
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read signing key {path}: {exc.strerror or exc}") from exc
    public_key: Any
    try:
        if b"PRIVATE KEY" in pem:
            public_key = serialization.load_pem_private_key(pem, password=None).public_key()
        else:
            public_key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"signing key {path} is not an unencrypted PEM key: {exc}") from exc
    if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size != 3072:
        raise ConfigError(f"signing key {path} must be RSA-3072 (as Gramine's enclave-key.pem)")
    modulus = public_key.public_numbers().n.to_bytes(_MODULUS_SIZE, "little")
    return hashlib.sha256(modulus).digest()


def simulated_measurement(
    extra_files: Sequence[Path] = (),
    *,
    code: Mapping[str, Path] | None = None,
    signing_key: Path | None = None,
    isv_prod_id: int = 0,
    isv_svn: int = 0,
    package_root: Path | None = None,
) -> Measurement:
    """The measurement a simulated party reports.

    mr_enclave = SHA-256 over the sorted (relative path, SHA-256 of content) entries of every
    file of the enclavefl package (`package_root`, default: the installed one; caches and
    bytecode excluded), of `extra_files` (the job file), named by file name, and of the user
    code the job can load (`code`: module name -> its file or package directory, see
    `enclavefl.jobs.refs.JobCode.measured`), named `code/<path from the module's parent>`. mr_signer =
    MRSIGNER of `signing_key`, or the public development signer DEVELOPMENT_MR_SIGNER.
    Each entry is hashed as 4-byte big-endian name length, UTF-8 name, 32-byte digest.
    """
    root = Path(package_root) if package_root is not None else Path(__file__).resolve().parents[1]
    entries = [(f"{root.name}/{rel}", digest) for rel, digest in _tree_digests(root)]
    seen: set[str] = set()
    for extra in extra_files:
        name = f"extra/{Path(extra).name}"
        if name in seen:
            raise UsageError(f"two measured extra files share the name {Path(extra).name!r}")
        seen.add(name)
        entries.append((name, _file_digest(Path(extra))))
    for location in (code or {}).values():
        location = Path(location)
        if location.is_dir():
            entries += [(f"code/{location.name}/{rel}", digest) for rel, digest in _tree_digests(location)]
        else:
            entries.append((f"code/{location.name}", _file_digest(location)))
    outer = hashlib.sha256()
    for name, digest in sorted(entries):
        encoded = name.encode("utf-8")
        outer.update(len(encoded).to_bytes(4, "big") + encoded + digest)
    mr_signer = DEVELOPMENT_MR_SIGNER if signing_key is None else mr_signer_of_key(signing_key)
    return Measurement(outer.digest(), mr_signer, isv_prod_id, isv_svn)


def _tree_digests(root: Path) -> Iterator[tuple[str, bytes]]:
    if not root.is_dir():
        raise UsageError(f"package root {root} is not a directory")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for filename in filenames:
            if filename.endswith((".pyc", ".pyo")):
                continue
            path = Path(dirpath, filename)
            yield path.relative_to(root).as_posix(), _file_digest(path)


def _file_digest(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()
    except OSError as exc:
        raise UsageError(f"cannot read measured file {path}: {exc.strerror or exc}") from exc
