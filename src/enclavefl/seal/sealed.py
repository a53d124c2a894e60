"""Sealed files: encrypted and authenticated artifacts at rest, bound to (job, name, version).

A sealed file is, in order::

    magic "EFLSEAL\\0" | format version (u16) | header length (u32) | header (CBOR map)
    | wrapped key length (u32) | wrapped key | Tink streaming ciphertext

* The header, in clear, names the key source (its spec, never the key), a key id (the
  first 8 bytes of HMAC-SHA256(KEK, "enclavefl/seal/kek-id/v1"), to tell a wrong key from
  an altered file), the job id, the artifact name and its version. It is for diagnostics
  and early, precise refusals; it is also authenticated (below).
* Every file gets a fresh Tink keyset (AES-256-GCM-HKDF streaming, 128 KiB segments). The
  serialized keyset is wrapped with AES-256-GCM under the key source's KEK; the wrap's
  associated data is AD || every byte before the wrapped key.
* AD = canonical CBOR of ["enclavefl-seal/v1", job id, name, version]; the stream is
  encrypted with the same AD. So altering any byte, truncating, renaming a file to
  another artifact, or replaying another job's file or an older version is refused with
  `SealError`, whose `check` is "format", "job-id", "artifact", "version", "key" or
  "integrity".

Writes are atomic (a temp file in the destination's directory, fsync, os.replace) and
leave nothing behind on failure. Unsealing writes plaintext under the real name only
after the whole stream authenticated. Memory stays bounded (a few 128 KiB segments) for
files of any size, except in `read_sealed`, which returns the whole plaintext.

API: `seal_file`/`unseal_file` (file to file), `write_sealed` (a stream to write into,
e.g. for torch.save), `read_sealed` (whole plaintext as bytes), `read_header`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast
from collections.abc import Iterator

import cbor2
import tink
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tink import secret_key_access, streaming_aead
from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

from enclavefl.errors import Check, ConfigError, FormatError, SealError, UsageError
from enclavefl.seal.keys import KEK_SIZE, KeySource
from enclavefl.validate import is_int

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "SEGMENT_SIZE",
    "SealedHeader",
    "read_header",
    "read_sealed",
    "seal_file",
    "unseal_file",
    "write_sealed",
]

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

MAGIC = b"EFLSEAL\x00"
FORMAT_VERSION = 1
_PREFIX = struct.Struct(">8sHI")  # magic, format version, header length
_LENGTH = struct.Struct(">I")
_MAX_HEADER = 64 * 1024
_MAX_WRAPPED = 4 * 1024
_WRAP_NONCE_SIZE = 12
_AD_LABEL = "enclavefl-seal/v1"
_KEK_ID_LABEL = b"enclavefl/seal/kek-id/v1"
_HEADER_FIELDS = {"key_source": str, "kek_id": str, "job_id": str, "name": str, "version": int}
# Tink's Python bindings move data through fixed 128 KiB buffers and copy each segment a
# few times between them; with segments of that size every copy stays in the CPU cache,
# which measured faster than Tink's 1 MiB template (bench/bench_seal.py). The per-segment
# cost (a 16-byte tag, a nonce) stays negligible.
SEGMENT_SIZE = 128 * 1024
_IO_CHUNK = SEGMENT_SIZE


def _streaming_template(segment_size: int) -> tink_pb2.KeyTemplate:
    key_format = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKeyFormat(key_size=32)
    key_format.params.hkdf_hash_type = common_pb2.SHA256
    key_format.params.derived_key_size = 32
    key_format.params.ciphertext_segment_size = segment_size
    return tink_pb2.KeyTemplate(
        type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
        value=key_format.SerializeToString(),
        output_prefix_type=tink_pb2.RAW,
    )


_TEMPLATE = _streaming_template(SEGMENT_SIZE)

streaming_aead.register()


@dataclass(frozen=True)
class SealedHeader:
    """The clear header of a sealed file (diagnostics only: trust it after unsealing)."""

    format_version: int
    key_source: str
    kek_id: str
    job_id: str
    name: str
    version: int


def _check_binding(job_id: str, name: str, version: int) -> None:
    for field, value in (("job_id", job_id), ("name", name)):
        if not isinstance(value, str) or not value:
            raise UsageError(f"sealed file {field} must be a non-empty string, got {value!r}")
    if not is_int(version) or version < 0:
        raise UsageError(f"sealed file version must be an integer >= 0, got {version!r}")


def _associated_data(job_id: str, name: str, version: int) -> bytes:
    return cbor2.dumps([_AD_LABEL, job_id, name, version], canonical=True)


def _kek(key: KeySource) -> bytes:
    kek = key.kek()
    if not isinstance(kek, bytes) or len(kek) != KEK_SIZE:
        size = len(kek) if isinstance(kek, bytes) else type(kek).__name__
        raise ConfigError(f"key source {key.spec} gave a key of {size} bytes; {KEK_SIZE} are required")
    return kek


def _kek_id(kek: bytes) -> str:
    return hmac.new(kek, _KEK_ID_LABEL, hashlib.sha256).digest()[:8].hex()


def _new_envelope(
    key: KeySource, job_id: str, name: str, version: int
) -> tuple[bytes, streaming_aead.StreamingAead, bytes]:
    """Everything before the ciphertext stream, the stream primitive and the AD."""
    _check_binding(job_id, name, version)
    ad = _associated_data(job_id, name, version)
    kek = _kek(key)
    handle = tink.new_keyset_handle(_TEMPLATE)
    header = cbor2.dumps(
        {"key_source": key.spec, "kek_id": _kek_id(kek), "job_id": job_id, "name": name, "version": version},
        canonical=True,
    )
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header
    nonce = os.urandom(_WRAP_NONCE_SIZE)
    keyset = tink.proto_keyset_format.serialize(handle, secret_key_access.TOKEN)
    wrapped = nonce + AESGCM(kek).encrypt(nonce, keyset, ad + prefix)
    return prefix + _LENGTH.pack(len(wrapped)) + wrapped, handle.primitive(streaming_aead.StreamingAead), ad


def _read_exact(f: BinaryIO, size: int, what: str, path: Path) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise SealError(f"{path}: truncated: the file ends inside the {what}", check=Check.INTEGRITY)
    return data


def _read_envelope(f: BinaryIO, path: Path) -> tuple[SealedHeader, bytes, bytes]:
    """Parse the clear part: the header, the bytes it was authenticated as, the wrapped key."""
    fixed = f.read(_PREFIX.size)
    if not fixed or not MAGIC.startswith(fixed[: len(MAGIC)]):
        raise FormatError(f"{path} is not an enclavefl sealed file (no {MAGIC!r} magic)")
    if len(fixed) != _PREFIX.size:
        raise SealError(f"{path}: truncated: the file ends inside the header", check=Check.INTEGRITY)
    _, format_version, header_size = _PREFIX.unpack(fixed)
    if format_version != FORMAT_VERSION:
        raise SealError(
            f"{path}: sealed in format version {format_version}; this enclavefl reads version {FORMAT_VERSION}",
            check=Check.FORMAT,
        )
    if header_size > _MAX_HEADER:
        raise SealError(f"{path}: header length {header_size} is implausible: file altered", check=Check.INTEGRITY)
    raw_header = _read_exact(f, header_size, "header", path)
    header = _parse_header(raw_header, format_version, path)
    wrapped_size = _LENGTH.unpack(_read_exact(f, _LENGTH.size, "wrapped data key", path))[0]
    if not _WRAP_NONCE_SIZE < wrapped_size <= _MAX_WRAPPED:
        raise SealError(
            f"{path}: wrapped key length {wrapped_size} is implausible: file altered", check=Check.INTEGRITY
        )
    wrapped = _read_exact(f, wrapped_size, "wrapped data key", path)
    return header, fixed + raw_header, wrapped


def _parse_header(raw: bytes, format_version: int, path: Path) -> SealedHeader:
    try:
        fields = cbor2.loads(raw)
    except cbor2.CBORDecodeError as exc:
        raise SealError(f"{path}: header unreadable: file altered", check=Check.INTEGRITY) from exc
    valid = (
        isinstance(fields, dict)
        and set(fields) == set(_HEADER_FIELDS)
        and all(type(fields[k]) is t for k, t in _HEADER_FIELDS.items())
    )
    if not valid:
        raise SealError(f"{path}: header fields are malformed: file altered", check=Check.INTEGRITY)
    return SealedHeader(format_version=format_version, **fields)


def read_header(path: StrPath) -> SealedHeader:
    """The clear header of a sealed file, for diagnostics; needs no key, proves nothing."""
    path = Path(path)
    with _open_source(path) as f:
        return _read_envelope(f, path)[0]


def _open_source(path: Path, buffering: int = -1) -> BinaryIO:
    try:
        return open(path, "rb", buffering=buffering)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc


def _open_stream(
    f: BinaryIO, path: Path, key: KeySource, job_id: str, name: str, version: int
) -> BinaryIO:
    """Check the clear header against the expected binding, unwrap the data key and
    return the decrypting stream over the rest of `f` (closing it closes `f`)."""
    _check_binding(job_id, name, version)
    header, authenticated_prefix, wrapped = _read_envelope(f, path)
    if header.job_id != job_id:
        raise SealError(f"{path}: sealed for job {header.job_id!r} but {job_id!r} was expected", check=Check.JOB_ID)
    if header.name != name:
        raise SealError(
            f"{path}: sealed for artifact {header.name!r} but {name!r} was expected", check=Check.ARTIFACT
        )
    if header.version != version:
        raise SealError(
            f"{path}: sealed at version {header.version} but version {version} was expected", check=Check.VERSION
        )
    kek = _kek(key)
    if not hmac.compare_digest(header.kek_id, _kek_id(kek)):
        raise SealError(
            f"{path}: wrong key (key source {key.spec} cannot unwrap the data key; "
            f"the file names {header.key_source} as its key source)",
            check=Check.KEY,
        )
    ad = _associated_data(job_id, name, version)
    try:
        nonce, sealed_keyset = wrapped[:_WRAP_NONCE_SIZE], wrapped[_WRAP_NONCE_SIZE:]
        keyset = AESGCM(kek).decrypt(nonce, sealed_keyset, ad + authenticated_prefix)
    except InvalidTag as exc:
        raise SealError(
            f"{path}: authentication failed: header or wrapped data key altered", check=Check.INTEGRITY
        ) from exc
    handle = tink.proto_keyset_format.parse(keyset, secret_key_access.TOKEN)
    return handle.primitive(streaming_aead.StreamingAead).new_decrypting_stream(f, ad)  # type: ignore[no-any-return]


def _unbuffered(stream: BinaryIO) -> BinaryIO:
    """The raw Tink stream under the io.Buffered* wrapper Tink returns.

    Bulk copies go to the raw stream: the buffered wrapper hands Tink memoryviews, which
    Tink copies again (writing) or copies out of Tink's bytes into its own (reading):
    one extra pass over every byte.
    """
    if isinstance(stream, (io.BufferedReader, io.BufferedWriter)):
        return cast(BinaryIO, stream.raw)
    return stream


def _copy_plaintext(stream: BinaryIO, out: BinaryIO, path: Path) -> None:
    read, write = _unbuffered(stream).read, out.write
    try:
        while True:
            chunk = read(_IO_CHUNK)
            if not chunk:
                # A raw stream says None for "no data yet"; Tink's blocking one never does,
                # but a stream cut short must never pass for a complete one.
                if chunk is None:
                    raise SealError(f"{path}: ciphertext stream stalled", check=Check.INTEGRITY)
                break
            write(chunk)
    except tink.TinkError as exc:
        raise SealError(f"{path}: authentication failed: file altered or truncated", check=Check.INTEGRITY) from exc


@contextmanager
def _atomic_output(dst: Path) -> Iterator[BinaryIO]:
    """A file that appears as `dst` (mode 0600) only if the block completes."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(f"cannot write {dst}: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        try:
            # closefd=False: Tink closes the file object it writes to, and we still need fsync.
            with open(fd, "wb", closefd=False) as out:
                yield out
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def write_sealed(
    path: StrPath, *, key: KeySource, job_id: str, name: str, version: int
) -> Iterator[BinaryIO]:
    """Write a sealed file through a stream: ``with write_sealed(p, ...) as f: f.write(...)``.

    The file appears at `path` only when the block ends without an exception.
    """
    path = Path(path)
    envelope, primitive, ad = _new_envelope(key, job_id, name, version)
    with _atomic_output(path) as out:
        out.write(envelope)
        out.flush()  # keeps Tink's 128 KiB writes aligned, so they bypass the buffer
        with primitive.new_encrypting_stream(out, ad) as stream:
            yield stream
    log.debug("sealed %s (job %s, artifact %s, version %d) under %s", path, job_id, name, version, key.spec)


def seal_file(src: StrPath, dst: StrPath, *, key: KeySource, job_id: str, name: str, version: int) -> None:
    """Seal the file `src` into `dst`, streaming (bounded memory)."""
    src = Path(src)
    with _open_source(src, buffering=0) as fin, write_sealed(
        dst, key=key, job_id=job_id, name=name, version=version
    ) as out:
        write = _unbuffered(out).write
        while chunk := fin.read(_IO_CHUNK):
            written = write(chunk)
            while written < len(chunk):  # a raw stream may take part of a write
                written += write(chunk[written:])


def unseal_file(src: StrPath, dst: StrPath, *, key: KeySource, job_id: str, name: str, version: int) -> None:
    """Unseal `src` into `dst`, streaming; `dst` appears only once all of `src` authenticated."""
    src = Path(src)
    with _open_source(src) as fin:
        stream = _open_stream(fin, src, key, job_id, name, version)
        with stream, _atomic_output(Path(dst)) as out:
            _copy_plaintext(stream, out, src)


def read_sealed(path: StrPath, *, key: KeySource, job_id: str, name: str, version: int) -> bytes:
    """The whole plaintext of a sealed file, returned only after all of it authenticated."""
    path = Path(path)
    with _open_source(path) as fin, _open_stream(fin, path, key, job_id, name, version) as stream:
        out = io.BytesIO()
        _copy_plaintext(stream, out, path)
    return out.getvalue()
