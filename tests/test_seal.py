"""Sealed files and key sources: round trips, every kind of tampering, atomic writes."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavefl.errors import ConfigError, FormatError, SealError, UsageError
from enclavefl.seal import keys
from enclavefl.seal import sealed as sealed_module
from enclavefl.seal.keys import (
    FileKeySource,
    SgxSealKeySource,
    create_key_file,
    parse_key_spec,
    register_key_scheme,
)
from enclavefl.seal.sealed import (
    MAGIC,
    SEGMENT_SIZE,
    read_header,
    read_sealed,
    seal_file,
    unseal_file,
    write_sealed,
)

BINDING = {"job_id": "job-1", "name": "model", "version": 3}
# Tink AES-GCM-HKDF streaming: 16-byte tag per segment; the first segment also holds the
# 40-byte stream header (length byte, 32-byte salt, 7-byte nonce prefix).
FIRST_SEGMENT_PLAINTEXT = SEGMENT_SIZE - 16 - 40
SEGMENT_PLAINTEXT = SEGMENT_SIZE - 16


def _data(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible test bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d/%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


@pytest.fixture(autouse=True)
def builtin_schemes_only(monkeypatch) -> None:
    """Other modules (enclavefl.net) register schemes when imported; these tests see only
    the built-in ones, whatever ran before them."""
    monkeypatch.setattr(keys, "_SCHEMES", {s: f for s, f in keys._SCHEMES.items() if s in ("file", "sgx-seal")})


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.fixture
def sealed(workdir: Path, key: FileKeySource) -> tuple[Path, bytes]:
    """A sealed file of four segments and its plaintext."""
    plain = _data(FIRST_SEGMENT_PLAINTEXT + 2 * SEGMENT_PLAINTEXT + 1000)
    src = workdir / "plain.bin"
    src.write_bytes(plain)
    dst = workdir / "model.sealed"
    seal_file(src, dst, key=key, **BINDING)
    src.unlink()
    return dst, plain


def _layout(path: Path) -> dict[str, int]:
    """Offsets of the parts of a sealed file."""
    blob = path.read_bytes()
    header_len = struct.unpack(">I", blob[10:14])[0]
    wrapped_at = 14 + header_len
    wrapped_len = struct.unpack(">I", blob[wrapped_at : wrapped_at + 4])[0]
    stream_at = wrapped_at + 4 + wrapped_len
    return {"header": 14, "wrapped": wrapped_at + 4, "stream": stream_at, "end": len(blob)}


def _flip(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))


def _refused_unseal(src: Path, key: FileKeySource, **binding) -> SealError:
    """Unseal must fail, leave no plaintext under the destination name and no temp file."""
    dst = src.parent / "restored.bin"
    before = set(src.parent.iterdir())
    with pytest.raises(SealError) as info:
        unseal_file(src, dst, key=key, **(binding or BINDING))
    assert not dst.exists()
    assert set(src.parent.iterdir()) == before
    with pytest.raises(SealError):
        read_sealed(src, key=key, **(binding or BINDING))
    return info.value


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        FIRST_SEGMENT_PLAINTEXT - 1,
        FIRST_SEGMENT_PLAINTEXT,
        FIRST_SEGMENT_PLAINTEXT + 1,
        FIRST_SEGMENT_PLAINTEXT + 3 * SEGMENT_PLAINTEXT,
        FIRST_SEGMENT_PLAINTEXT + 3 * SEGMENT_PLAINTEXT + 12345,
    ],
)
def test_round_trip(workdir: Path, key: FileKeySource, size: int) -> None:
    plain = _data(size, seed=size)
    (workdir / "plain.bin").write_bytes(plain)
    seal_file(workdir / "plain.bin", workdir / "s", key=key, **BINDING)
    unseal_file(workdir / "s", workdir / "out.bin", key=key, **BINDING)
    assert (workdir / "out.bin").read_bytes() == plain
    assert read_sealed(workdir / "s", key=key, **BINDING) == plain
    assert sorted(p.name for p in workdir.iterdir()) == ["out.bin", "plain.bin", "s"]


def test_write_sealed_stream_many_small_writes(workdir: Path, key: FileKeySource) -> None:
    parts = [_data(n, seed=n) for n in range(0, 3000, 7)]
    with write_sealed(workdir / "ids.sealed", key=key, job_id="j", name="aligned-ids", version=0) as f:
        for part in parts:
            f.write(part)
    restored = read_sealed(workdir / "ids.sealed", key=key, job_id="j", name="aligned-ids", version=0)
    assert restored == b"".join(parts)


def test_header_is_clear_but_holds_no_secret(sealed: tuple[Path, bytes], key: FileKeySource) -> None:
    path, plain = sealed
    header = read_header(path)
    assert (header.job_id, header.name, header.version) == ("job-1", "model", 3)
    assert header.key_source == key.spec
    assert header.format_version == 1
    blob = path.read_bytes()
    assert blob.startswith(MAGIC)
    kek = key.kek()
    assert kek not in blob and kek.hex().encode() not in blob
    assert plain[:64] not in blob
    assert path.stat().st_mode & 0o777 == 0o600


def test_two_seals_of_the_same_bytes_differ(workdir: Path, key: FileKeySource) -> None:
    (workdir / "p").write_bytes(_data(5000))
    seal_file(workdir / "p", workdir / "a", key=key, **BINDING)
    seal_file(workdir / "p", workdir / "b", key=key, **BINDING)
    a, b = (workdir / "a").read_bytes(), (workdir / "b").read_bytes()
    header_end = _layout(workdir / "a")["wrapped"] - 4
    assert a[:header_end] == b[:header_end]  # same clear header
    assert a[header_end:] != b[header_end:]  # fresh data key, nonce and salt per file


def test_memory_stays_bounded(workdir: Path, key: FileKeySource) -> None:
    size = 24 << 20
    chunk = _data(1 << 20)
    with open(workdir / "big", "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
    tracemalloc.start()
    try:
        seal_file(workdir / "big", workdir / "big.sealed", key=key, **BINDING)
        _, seal_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        unseal_file(workdir / "big.sealed", workdir / "big.out", key=key, **BINDING)
        _, unseal_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seal_peak < 4 << 20 and unseal_peak < 4 << 20, (seal_peak, unseal_peak)
    assert (workdir / "big.out").stat().st_size == size


# ------------------------------------------------------------------------------ tampering


def test_changed_header_byte_is_refused(sealed: tuple[Path, bytes], key: FileKeySource) -> None:
    path, _ = sealed
    blob = path.read_bytes()
    at = blob.index(b"file:") + 6  # inside the key-source description
    _flip(path, at)
    err = _refused_unseal(path, key)
    assert err.check == "integrity"
    assert "authentication failed: header or wrapped data key altered" in err.reason


def test_forged_header_naming_the_expected_artifact_is_refused(
    sealed: tuple[Path, bytes], key: FileKeySource
) -> None:
    """Rename a file to another artifact AND rewrite its clear header to match."""
    path, _ = sealed
    blob = path.read_bytes()
    at = _layout(path)
    fields = cbor2.loads(blob[at["header"] : at["wrapped"] - 4])
    fields["name"] = "optimizer"
    header = cbor2.dumps(fields, canonical=True)
    forged = blob[:10] + struct.pack(">I", len(header)) + header + blob[at["wrapped"] - 4 :]
    path.write_bytes(forged)
    assert read_header(path).name == "optimizer"
    err = _refused_unseal(path, key, **{**BINDING, "name": "optimizer"})
    assert err.check == "integrity"


def test_changed_magic_is_not_a_sealed_file(sealed: tuple[Path, bytes], key: FileKeySource) -> None:
    path, _ = sealed
    _flip(path, 0)
    with pytest.raises(FormatError, match="not an enclavefl sealed file"):
        unseal_file(path, path.parent / "out", key=key, **BINDING)
    assert not (path.parent / "out").exists()


def test_unknown_format_version_is_refused(sealed: tuple[Path, bytes], key: FileKeySource) -> None:
    path, _ = sealed
    _flip(path, 9)
    err = _refused_unseal(path, key)
    assert err.check == "format"
    assert "format version" in err.reason


def test_changed_wrapped_key_byte_is_refused(sealed: tuple[Path, bytes], key: FileKeySource) -> None:
    path, _ = sealed
    at = _layout(path)
    _flip(path, at["wrapped"] + 20)
    err = _refused_unseal(path, key)
    assert err.check == "integrity"
    assert "header or wrapped data key altered" in err.reason


@pytest.mark.parametrize(
    "where", ["stream-header", "first-segment", "middle-segment", "last-segment", "last-byte"]
)
def test_changed_ciphertext_byte_is_refused(sealed: tuple[Path, bytes], key: FileKeySource, where: str) -> None:
    path, _ = sealed
    at = _layout(path)
    offset = {
        "stream-header": at["stream"] + 5,
        "first-segment": at["stream"] + 100,
        "middle-segment": at["stream"] + 2 * SEGMENT_SIZE + 7,
        "last-segment": at["end"] - 500,
        "last-byte": at["end"] - 1,
    }[where]
    _flip(path, offset)
    err = _refused_unseal(path, key)
    assert err.check == "integrity"
    assert err.reason.endswith("authentication failed: file altered or truncated")


@pytest.mark.parametrize(
    "cut",
    ["in-magic", "in-header", "in-wrapped-key", "before-stream", "in-stream-header", "segment-boundary",
     "mid-segment", "last-byte"],
)
def test_truncation_is_refused(sealed: tuple[Path, bytes], key: FileKeySource, cut: str) -> None:
    path, _ = sealed
    at = _layout(path)
    keep = {
        "in-magic": 3,
        "in-header": at["header"] + 5,
        "in-wrapped-key": at["wrapped"] + 10,
        "before-stream": at["stream"],
        "in-stream-header": at["stream"] + 20,
        "segment-boundary": at["stream"] + 2 * SEGMENT_SIZE,
        "mid-segment": at["stream"] + 2 * SEGMENT_SIZE + 999,
        "last-byte": at["end"] - 1,
    }[cut]
    path.write_bytes(path.read_bytes()[:keep])
    err = _refused_unseal(path, key)
    assert err.check == "integrity"
    assert "truncated" in err.reason


def test_appended_bytes_are_refused(sealed: tuple[Path, bytes], key: FileKeySource) -> None:
    path, _ = sealed
    with open(path, "ab") as f:
        f.write(b"\x00")
    assert _refused_unseal(path, key).check == "integrity"


def test_empty_file_is_not_a_sealed_file(workdir: Path, key: FileKeySource) -> None:
    (workdir / "empty").write_bytes(b"")
    with pytest.raises(FormatError):
        read_sealed(workdir / "empty", key=key, **BINDING)


@pytest.fixture(scope="module")
def small_sealed(tmp_path_factory) -> tuple[FileKeySource, bytes]:
    work = tmp_path_factory.mktemp("small")
    key = create_key_file(work / "k")
    with write_sealed(work / "s", key=key, **BINDING) as f:
        f.write(_data(FIRST_SEGMENT_PLAINTEXT + 100))
    return key, (work / "s").read_bytes()


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_single_byte_change_is_refused(small_sealed: tuple[FileKeySource, bytes], data: st.DataObject) -> None:
    key, original = small_sealed
    blob = bytearray(original)
    offset = data.draw(st.integers(0, len(blob) - 1))
    blob[offset] ^= data.draw(st.integers(1, 255))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "s").write_bytes(bytes(blob))
        with pytest.raises((SealError, FormatError)):
            read_sealed(Path(tmp) / "s", key=key, **BINDING)


# --------------------------------------------------------------- binding: job, name, version


def test_other_artifact_is_refused(sealed: tuple[Path, bytes], key: FileKeySource) -> None:
    path, _ = sealed
    err = _refused_unseal(path, key, **{**BINDING, "name": "optimizer"})
    assert err.check == "artifact"
    assert "sealed for artifact 'model' but 'optimizer' was expected" in err.reason


def test_other_job_is_refused(sealed: tuple[Path, bytes], key: FileKeySource) -> None:
    path, _ = sealed
    err = _refused_unseal(path, key, **{**BINDING, "job_id": "job-2"})
    assert err.check == "job-id"
    assert "sealed for job 'job-1' but 'job-2' was expected" in err.reason


@pytest.mark.parametrize("expected", [4, 2])
def test_other_version_is_refused(sealed: tuple[Path, bytes], key: FileKeySource, expected: int) -> None:
    path, _ = sealed
    err = _refused_unseal(path, key, **{**BINDING, "version": expected})
    assert err.check == "version"
    assert f"sealed at version 3 but version {expected} was expected" in err.reason


def test_wrong_key_is_refused(sealed: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = sealed
    other = create_key_file(tmp_path / "other.hex")
    err = _refused_unseal(path, other)
    assert err.check == "key"
    assert f"wrong key (key source {other.spec} cannot unwrap the data key" in err.reason


def test_wrong_key_with_forged_key_id_fails_authentication(sealed: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = sealed
    other = create_key_file(tmp_path / "other.hex")
    # Make the clear key id claim the other key; the wrap must still refuse it.
    blob = path.read_bytes()
    at = _layout(path)
    fields = cbor2.loads(blob[at["header"] : at["wrapped"] - 4])
    seal_file_for_id = tmp_path / "probe"
    with write_sealed(seal_file_for_id, key=other, **BINDING) as f:
        f.write(b"x")
    fields["kek_id"] = read_header(seal_file_for_id).kek_id
    header = cbor2.dumps(fields, canonical=True)
    path.write_bytes(blob[:10] + struct.pack(">I", len(header)) + header + blob[at["wrapped"] - 4 :])
    assert _refused_unseal(path, other).check == "integrity"


# ------------------------------------------------------------------------- atomic writes


class _Boom(Exception):
    pass


def test_crash_mid_write_leaves_nothing(workdir: Path, key: FileKeySource) -> None:
    dst = workdir / "ckpt.sealed"
    with pytest.raises(_Boom), write_sealed(dst, key=key, **BINDING) as f:
        f.write(_data(3 * SEGMENT_SIZE))
        raise _Boom
    assert list(workdir.iterdir()) == []


def test_crash_mid_write_keeps_previous_file(workdir: Path, key: FileKeySource) -> None:
    dst = workdir / "ckpt.sealed"
    with write_sealed(dst, key=key, **BINDING) as f:
        f.write(b"old checkpoint")
    before = dst.read_bytes()
    with pytest.raises(_Boom), write_sealed(dst, key=key, **{**BINDING, "version": 4}) as f:
        f.write(_data(SEGMENT_SIZE))
        raise _Boom
    assert dst.read_bytes() == before
    assert [p.name for p in workdir.iterdir()] == ["ckpt.sealed"]


def test_failing_source_read_leaves_nothing(workdir: Path, key: FileKeySource, monkeypatch) -> None:
    src = workdir / "plain.bin"
    src.write_bytes(_data(4 * SEGMENT_SIZE))
    real_open = open
    calls = {"n": 0}

    class HalfwayFailing:
        def __init__(self, f):
            self._f = f

        def read(self, n):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError("disk went away")
            return self._f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return HalfwayFailing(f) if Path(str(path)) == src else f

    # Shadow open() in the sealed module only, so the source fails after two chunks.
    monkeypatch.setattr(sealed_module, "open", fake_open, raising=False)
    with pytest.raises(OSError, match="disk went away"):
        seal_file(src, workdir / "out.sealed", key=key, **BINDING)
    monkeypatch.undo()
    assert calls["n"] == 3
    assert [p.name for p in workdir.iterdir()] == ["plain.bin"]


@pytest.mark.parametrize("operation", ["seal", "unseal"])
def test_failing_rename_leaves_destination_untouched(
    sealed: tuple[Path, bytes], key: FileKeySource, monkeypatch, operation: str
) -> None:
    path, plain = sealed
    work = path.parent
    (work / "plain.bin").write_bytes(plain)
    dst = work / "dst"
    dst.write_bytes(b"previous")
    before = set(work.iterdir())

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        if operation == "seal":
            seal_file(work / "plain.bin", dst, key=key, **BINDING)
        else:
            unseal_file(path, dst, key=key, **BINDING)
    assert dst.read_bytes() == b"previous"
    assert set(work.iterdir()) == before


def test_tampered_unseal_keeps_previous_destination(sealed: tuple[Path, bytes], key: FileKeySource) -> None:
    path, _ = sealed
    dst = path.parent / "restored.bin"
    dst.write_bytes(b"previous plaintext")
    _flip(path, _layout(path)["end"] - 3)
    with pytest.raises(SealError):
        unseal_file(path, dst, key=key, **BINDING)
    assert dst.read_bytes() == b"previous plaintext"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.sealed", "restored.bin"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "binding",
    [{"job_id": ""}, {"name": ""}, {"version": -1}, {"version": True}, {"version": "3"}],
)
def test_bad_binding_is_a_usage_error(workdir: Path, key: FileKeySource, binding: dict) -> None:
    with pytest.raises(UsageError), write_sealed(workdir / "x", key=key, **{**BINDING, **binding}):
        pass
    assert list(workdir.iterdir()) == []


def test_missing_source_and_directory_are_usage_errors(workdir: Path, key: FileKeySource) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        seal_file(workdir / "absent", workdir / "x", key=key, **BINDING)
    (workdir / "p").write_bytes(b"p")
    with pytest.raises(UsageError, match="cannot write"):
        seal_file(workdir / "p", workdir / "no-dir" / "x", key=key, **BINDING)


def test_key_source_giving_a_short_key_is_refused(workdir: Path) -> None:
    class ShortKey:
        spec = "test:short"

        def kek(self) -> bytes:
            return b"k" * 16

    with pytest.raises(ConfigError, match="test:short gave a key of 16 bytes"):
        with write_sealed(workdir / "x", key=ShortKey(), **BINDING):
            pass


# ---------------------------------------------------------------------------- key sources


def _fake_gramine_keys(root: Path, mrenclave: bytes, mrsigner: bytes) -> Path:
    root.mkdir(exist_ok=True)
    (root / "_sgx_mrenclave").write_bytes(mrenclave)
    (root / "_sgx_mrsigner").write_bytes(mrsigner)
    return root


def test_sgx_seal_round_trip_with_fake_key_directory(tmp_path: Path, workdir: Path) -> None:
    root = _fake_gramine_keys(tmp_path / "keys", bytes(range(16)), bytes(range(16, 32)))
    enclave_key = parse_key_spec(f"sgx-seal:mrenclave?root={root}")
    signer_key = parse_key_spec(f"sgx-seal:mrsigner?root={root}")
    assert enclave_key.spec == f"sgx-seal:mrenclave?root={root}"
    (workdir / "p").write_bytes(_data(70000))
    seal_file(workdir / "p", workdir / "s", key=enclave_key, **BINDING)
    assert read_sealed(workdir / "s", key=enclave_key, **BINDING) == _data(70000)
    assert read_header(workdir / "s").key_source == enclave_key.spec
    # The MRSIGNER key is another key.
    assert _refused_unseal(workdir / "s", signer_key).check == "key"
    # A new enclave build has a new MRENCLAVE sealing key: its files are not readable.
    _fake_gramine_keys(root, bytes(range(1, 17)), bytes(range(16, 32)))
    err = _refused_unseal(workdir / "s", enclave_key)
    assert err.check == "key" and "sgx-seal:mrenclave" in err.reason


def test_sgx_seal_kek_is_hkdf_of_the_sealing_key(tmp_path: Path) -> None:
    sealing = bytes(range(16))
    root = _fake_gramine_keys(tmp_path / "keys", sealing, sealing)
    kek = SgxSealKeySource("mrenclave", root).kek()
    expected = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"enclavefl/seal/kek/v1/sgx-seal:mrenclave"
    ).derive(sealing)
    assert kek == expected and len(kek) == 32
    assert SgxSealKeySource("mrsigner", root).kek() != kek  # domain-separated per kind


def test_sgx_seal_default_root_is_gramine_device(tmp_path: Path) -> None:
    source = parse_key_spec("sgx-seal:mrsigner")
    assert source.spec == "sgx-seal:mrsigner"
    assert source.root == Path("/dev/attestation/keys")


def test_sgx_seal_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only inside a Gramine SGX enclave"):
        SgxSealKeySource("mrenclave", tmp_path).kek()
    (tmp_path / "_sgx_mrenclave").write_bytes(b"x" * 32)
    with pytest.raises(ConfigError, match="holds 32 bytes"):
        SgxSealKeySource("mrenclave", tmp_path).kek()


def test_file_key_formats(tmp_path: Path) -> None:
    raw = bytes(range(32))
    formats = [("raw", raw), ("hex", raw.hex().encode()), ("hex-crlf", raw.hex().upper().encode() + b"\r\n")]
    for name, content in formats:
        path = tmp_path / name
        path.write_bytes(content)
        path.chmod(0o600)
        assert FileKeySource(path).kek() == raw


@pytest.mark.parametrize(
    "content", [b"k" * 31, b"k" * 33, b"a" * 63, b"g" * 64, b"a" * 65, b"a" * 64 + b"\n\n\n", b""]
)
def test_file_key_bad_sizes_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="neither 32 raw bytes nor 64 hex characters"):
        FileKeySource(path).kek()


def test_file_key_permissions(tmp_path: Path, caplog) -> None:
    path = tmp_path / "k"
    path.write_bytes(bytes(32))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by other users"):
        FileKeySource(path).kek()
    path.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="enclavefl.seal.keys"):
        assert FileKeySource(path).kek() == bytes(32)
    assert "accessible by its group" in caplog.text
    assert bytes(32).hex() not in caplog.text


def test_create_key_file(tmp_path: Path) -> None:
    source = create_key_file(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert len(source.kek()) == 32
    assert source.spec == f"file:{tmp_path / 'k'}"
    before = (tmp_path / "k").read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite"):
        create_key_file(tmp_path / "k")
    assert (tmp_path / "k").read_bytes() == before
    assert create_key_file(tmp_path / "k2").kek() != source.kek()


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; create it with: enclavefl keygen"):
        parse_key_spec(f"file:{tmp_path / 'absent'}").kek()


# --------------------------------------------------------------------------- key specs


def test_parse_file_spec(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="enclavefl.seal.keys"):
        source = parse_key_spec(f"file:{tmp_path / 'k'}")
    assert isinstance(source, FileKeySource) and source.path == tmp_path / "k"
    assert "insecure" in caplog.text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "has no scheme"),
        ("no-colon", "has no scheme"),
        (":x", "has no scheme"),
        ("file:", "has no path"),
        ("broker:https://kb:7443/job-1", "key scheme 'broker'"),
        ("sgx-seal:mrfoo", "kind 'mrfoo' is unknown"),
        ("sgx-seal:mrenclave?rot=/tmp", "unknown parameter"),
        ("sgx-seal:mrenclave?root=", "root= must be given once"),
        ("sgx-seal:mrenclave?root=/a&root=/b", "root= must be given once"),
    ],
)
def test_bad_key_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_key_spec(spec)


def test_unregistered_scheme_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_key_spec("broker:kb.example:7443")
    assert "known schemes: file, sgx-seal" in info.value.reason


def test_register_key_scheme(tmp_path: Path) -> None:
    key_path = tmp_path / "k"
    create_key_file(key_path)

    def factory(rest: str) -> FileKeySource:
        assert rest == "kb.example:7443/job-1"
        return FileKeySource(key_path)

    register_key_scheme("broker", factory)
    register_key_scheme("broker", factory)  # the same factory again is fine
    assert parse_key_spec("broker:kb.example:7443/job-1").kek() == FileKeySource(key_path).kek()
    with pytest.raises(UsageError, match="already registered"):
        register_key_scheme("broker", lambda rest: FileKeySource(key_path))
    with pytest.raises(UsageError, match="invalid"):
        register_key_scheme("a:b", factory)
    assert keys.known_key_schemes() == ["broker", "file", "sgx-seal"]
