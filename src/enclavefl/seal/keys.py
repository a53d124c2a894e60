"""Key sources: where the key-encryption key (KEK) of sealed files comes from.

A key spec names a source; `parse_key_spec` turns it into a `KeySource`:

* ``file:PATH`` -- a key file holding 32 raw bytes or 64 hex characters (a trailing
  newline is allowed). INSECURE, for development: the key lies on the host's disk.
  Create one with `create_key_file`. Files readable by other users are refused.
* ``sgx-seal:mrenclave`` / ``sgx-seal:mrsigner`` -- Gramine's SGX sealing keys
  (/dev/attestation/keys/_sgx_mrenclave, _sgx_mrsigner: 16 raw bytes each). The KEK is
  derived from them with HKDF-SHA256, so the raw sealing key is never used directly
  (Gramine warns against using one key for two purposes). ``?root=DIR`` replaces
  /dev/attestation/keys (tests stand a temporary directory in for the device).
* More schemes (``broker:``) join through `register_key_scheme`.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from collections.abc import Callable
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclavefl.errors import ConfigError, UsageError

__all__ = [
    "GRAMINE_KEYS_DIR",
    "KEK_SIZE",
    "FileKeySource",
    "KeySource",
    "SgxSealKeySource",
    "create_key_file",
    "derive_mount_key",
    "ensure_development_key",
    "known_key_schemes",
    "parse_key_spec",
    "register_key_scheme",
    "write_random_key",
]

log = logging.getLogger(__name__)

KEK_SIZE = 32
GRAMINE_KEYS_DIR = Path("/dev/attestation/keys")
_SGX_SEAL_KEY_SIZE = 16
_MOUNT_KEY_SIZE = 16  # Gramine encrypted files use AES-GCM-128 keys
_MOUNT_KEY_INFO = b"enclavefl/gramine/encrypted-mount/v1/"
_SGX_SEAL_KINDS = ("mrenclave", "mrsigner")
_KEY_FILE_MAX = KEK_SIZE * 2 + 2
_HEX_KEY = re.compile(rb"[0-9a-fA-F]{%d}" % (KEK_SIZE * 2))


class KeySource(Protocol):
    """Gives the 32-byte key-encryption key. `spec` is safe to log (it holds no secret)."""

    @property
    def spec(self) -> str: ...

    def kek(self) -> bytes: ...


@dataclass(frozen=True)
class FileKeySource:
    """A KEK read from a key file. Insecure: for development only."""

    path: Path

    @property
    def spec(self) -> str:
        return f"file:{self.path}"

    def kek(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read(_KEY_FILE_MAX + 1)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"key file {self.path} does not exist; create it with: enclavefl keygen {self.path}"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"key file {self.path} cannot be read: {exc.strerror}") from exc
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IRWXO:
            raise ConfigError(
                f"key file {self.path} is accessible by other users (mode {mode:04o}); "
                f"run: chmod 600 {self.path}"
            )
        if mode & stat.S_IRWXG:
            log.warning("key file %s is accessible by its group (mode %04o)", self.path, mode)
        if len(raw) == KEK_SIZE:
            return raw
        text = raw.removesuffix(b"\n").removesuffix(b"\r")
        if _HEX_KEY.fullmatch(text):
            return bytes.fromhex(text.decode("ascii"))
        raise ConfigError(
            f"key file {self.path} holds {st.st_size} bytes that are neither {KEK_SIZE} raw bytes nor "
            f"{KEK_SIZE * 2} hex characters"
        )


def write_random_key(path: str | os.PathLike[str]) -> Path:
    """Write a fresh random key (64 hex characters, mode 0600) to `path`; never overwrites.

    Missing parent folders are created (mode 0700). The key is written to a temporary
    file and linked into place, so a party reading `path` at the same time sees either
    no file or the whole key, never a half-written one.
    """
    path = Path(path)
    if path.exists():
        raise UsageError(f"key file {path} already exists; refusing to overwrite it")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(f"key file {path} cannot be created: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(KEK_SIZE).hex().encode("ascii") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError as exc:
        raise UsageError(f"key file {path} already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise UsageError(f"key file {path} cannot be created: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def create_key_file(path: str | os.PathLike[str]) -> FileKeySource:
    """A fresh `file:` key source: the key sits on the host, so this warns (development only)."""
    path = write_random_key(path)
    log.warning("created key file %s: file: keys are insecure, for development only", path)
    return FileKeySource(path)


def ensure_development_key(source: KeySource) -> bool:
    """Create the key file of a `file:` source that does not exist yet; True if it was created.

    For simulation mode only (the caller checks): another party racing to create the
    same file is fine, whoever links it first wins and both use that key.
    """
    if not isinstance(source, FileKeySource) or source.path.exists():
        return False
    try:
        create_key_file(source.path)
    except UsageError:
        if source.path.exists():  # another party of the same job created it first
            return False
        raise
    return True


@dataclass(frozen=True)
class SgxSealKeySource:
    """A KEK derived from Gramine's SGX sealing key bound to MRENCLAVE or MRSIGNER."""

    kind: str
    root: Path = GRAMINE_KEYS_DIR

    def __post_init__(self) -> None:
        if self.kind not in _SGX_SEAL_KINDS:
            raise ConfigError(
                f"sgx-seal key kind {self.kind!r} is unknown; expected one of {', '.join(_SGX_SEAL_KINDS)}"
            )

    @property
    def spec(self) -> str:
        spec = f"sgx-seal:{self.kind}"
        return spec if self.root == GRAMINE_KEYS_DIR else f"{spec}?root={self.root}"

    def kek(self) -> bytes:
        path = self.root / f"_sgx_{self.kind}"
        try:
            sealing_key = path.read_bytes()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{path} not found: sgx-seal keys exist only inside a Gramine SGX enclave"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"{path} cannot be read: {exc.strerror}") from exc
        if len(sealing_key) != _SGX_SEAL_KEY_SIZE:
            raise ConfigError(
                f"{path} holds {len(sealing_key)} bytes; a Gramine sealing key has {_SGX_SEAL_KEY_SIZE}"
            )
        return _hkdf(sealing_key, info=f"enclavefl/seal/kek/v1/sgx-seal:{self.kind}".encode("ascii"), length=KEK_SIZE)


def derive_mount_key(source: KeySource, name: str) -> bytes:
    """The key of Gramine's encrypted mount `name`, derived from `source`'s KEK.

    HKDF-SHA256(KEK, info="enclavefl/gramine/encrypted-mount/v1/<name>"), 16 bytes (Gramine
    encrypted files use AES-GCM-128), so it never equals the key that seals files themselves.
    """
    return _hkdf(source.kek(), info=_MOUNT_KEY_INFO + name.encode("ascii"), length=_MOUNT_KEY_SIZE)


def _hkdf(secret: bytes, *, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def _file_source(rest: str) -> KeySource:
    if not rest:
        raise ConfigError("key spec 'file:' has no path; expected file:PATH")
    log.warning("key source file:%s is insecure (the key lies on the host); for development only", rest)
    return FileKeySource(Path(rest))


def _sgx_seal_source(rest: str) -> KeySource:
    kind, _, query = rest.partition("?")
    params = parse_qs(query, keep_blank_values=True, strict_parsing=False) if query else {}
    unknown = sorted(set(params) - {"root"})
    if unknown:
        raise ConfigError(
            f"key spec sgx-seal:{rest}: unknown parameter(s) {', '.join(unknown)}; only root= is known"
        )
    roots = params.get("root", [str(GRAMINE_KEYS_DIR)])
    if len(roots) != 1 or not roots[0]:
        raise ConfigError(f"key spec sgx-seal:{rest}: root= must be given once, with a directory")
    return SgxSealKeySource(kind, Path(roots[0]))


_SCHEMES: dict[str, Callable[[str], KeySource]] = {
    "file": _file_source,
    "sgx-seal": _sgx_seal_source,
}


def register_key_scheme(scheme: str, factory: Callable[[str], KeySource]) -> None:
    """Make `scheme:REST` specs resolve to `factory(REST)`. Registering twice is refused,
    unless it is the same factory again."""
    if not scheme or ":" in scheme:
        raise UsageError(f"key scheme {scheme!r} is invalid: it must be non-empty and contain no ':'")
    known = _SCHEMES.get(scheme)
    if known is not None and known is not factory:
        raise UsageError(f"key scheme {scheme!r} is already registered")
    _SCHEMES[scheme] = factory


def known_key_schemes() -> list[str]:
    return sorted(_SCHEMES)


def parse_key_spec(spec: str) -> KeySource:
    """Resolve a key spec such as ``file:/run/keys/job.key`` or ``sgx-seal:mrsigner``."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not scheme:
        raise ConfigError(
            f"key spec {spec!r} has no scheme; expected SCHEME:..., with SCHEME one of "
            f"{', '.join(known_key_schemes())}"
        )
    factory = _SCHEMES.get(scheme)
    if factory is None:
        raise ConfigError(
            f"key scheme {scheme!r} (in key spec {spec!r}) is not known; known schemes: "
            f"{', '.join(known_key_schemes())}"
        )
    return factory(rest)
