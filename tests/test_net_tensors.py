"""Tensor framing without a network: round trips, the frame codec, sinks and validation."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavefl.errors import FormatError, UsageError
from enclavefl.net import enclavefl_pb2 as pb
from enclavefl.net.allocator import bound_allocator, tune_allocator
from enclavefl.net.tensors import (
    Chunk,
    DigestSink,
    LazyTensor,
    Limits,
    Malformed,
    MemmapSink,
    Message,
    TensorDigest,
    decode_message,
    encode_message,
    parse_frame,
    serialize_frame,
)


def roundtrip(message: Message, *, chunk_size: int = 1024, **kwargs: object) -> tuple[str, Message]:
    # Through bytes, as on the wire.
    frames = [parse_frame(serialize_frame(f)) for f in encode_message(message, method="m", chunk_size=chunk_size)]
    return decode_message(iter(frames), **kwargs)  # type: ignore[arg-type]


NUMPY_DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                "float16", "float32", "float64", "complex64", "complex128"]  # fmt: skip


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_dtypes_roundtrip(dtype: str) -> None:
    rng = np.random.default_rng(0)
    value = (rng.standard_normal((7, 33)) * 100).astype(dtype)
    method, got = roundtrip(Message(meta={"a": [1, "x"]}, tensors={"t": value}), chunk_size=100)
    assert method == "m"
    assert got.meta == {"a": [1, "x"]}
    assert isinstance(got.tensors["t"], np.ndarray)
    assert got.tensors["t"].dtype == value.dtype
    np.testing.assert_array_equal(got.tensors["t"], value)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.bool, torch.uint8]
)
def test_torch_dtypes_roundtrip(dtype: torch.dtype) -> None:
    value = (torch.randn(5, 4, 3) * 10).to(dtype)
    _, got = roundtrip(Message(tensors={"w": value}), chunk_size=7)
    assert isinstance(got.tensors["w"], torch.Tensor)
    assert got.tensors["w"].dtype == dtype
    assert torch.equal(got.tensors["w"], value)


def test_torch_views_and_grad_are_sent_as_values() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6).requires_grad_(True)
    view = base.t()[1:, ::2]  # non-contiguous
    _, got = roundtrip(Message(tensors={"v": view}))
    assert torch.equal(got.tensors["v"], view.detach())


def test_non_contiguous_and_big_endian_numpy() -> None:
    base = np.arange(60, dtype=">i4").reshape(6, 10)
    value = base[::2, 1::3]
    _, got = roundtrip(Message(tensors={"v": value}))
    np.testing.assert_array_equal(got.tensors["v"], value)
    assert got.tensors["v"].dtype == np.dtype("<i4")


def test_zero_size_scalar_and_many_tensors() -> None:
    tensors = {
        "empty": np.zeros((0, 5), np.float32),
        "scalar": np.array(3.5),
        "torch_empty": torch.zeros(3, 0, dtype=torch.bfloat16),
        **{f"t{i}": np.full(i + 1, i, np.int16) for i in range(20)},
    }
    _, got = roundtrip(Message(tensors=tensors))
    assert list(got.tensors) == list(tensors)
    assert got.tensors["empty"].shape == (0, 5)
    assert got.tensors["scalar"].shape == () and got.tensors["scalar"] == 3.5
    assert got.tensors["torch_empty"].shape == (3, 0) and got.tensors["torch_empty"].dtype == torch.bfloat16
    np.testing.assert_array_equal(got.tensors["t19"], np.full(20, 19, np.int16))


def test_multi_chunk_frames_are_bounded_by_chunk_size() -> None:
    value = np.arange(10_000, dtype=np.float64)
    frames = list(encode_message(Message(tensors={"x": value}), chunk_size=4096))
    chunks = [f for f in frames if isinstance(f, Chunk)]
    assert len(chunks) == -(-value.nbytes // 4096)
    assert all(len(c.data) <= 4096 for c in chunks)


def test_message_accessors() -> None:
    _, got = roundtrip(Message(tensors={"n": np.ones(3, np.float32), "b": torch.ones(2, dtype=torch.bfloat16)}))
    assert got.torch("n").dtype == torch.float32
    assert got.numpy("n").dtype == np.float32
    with pytest.raises(UsageError, match="bfloat16"):
        got.numpy("b")


def test_lazy_tensor_streams_and_checks_its_size() -> None:
    blocks = [bytes([i]) * 1000 for i in range(5)]
    lazy = LazyTensor("uint8", (5000,), lambda: iter(blocks))
    _, got = roundtrip(Message(tensors={"l": lazy}), chunk_size=300)
    assert got.tensors["l"].tobytes() == b"".join(blocks)

    short = LazyTensor("uint8", (5001,), lambda: iter(blocks))
    with pytest.raises(UsageError, match="yielded 5000 bytes, declared 5001"):
        roundtrip(Message(tensors={"l": short}))
    long = LazyTensor("uint8", (4999,), lambda: iter(blocks))
    with pytest.raises(UsageError, match="more than the declared 4999"):
        roundtrip(Message(tensors={"l": long}))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([1, 2, 3], "expected a numpy array"),
        (np.array(["a"]), "dtype <U1 cannot be sent"),
        (np.array([object()]), "cannot be sent"),
        (torch.zeros(2, dtype=torch.float8_e4m3fn), "float8_e4m3fn cannot be sent"),
        (torch.ones(2).to_sparse(), "only dense tensors"),
    ],
)
def test_unsendable_values(value: object, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        roundtrip(Message(tensors={"x": value}))


def test_meta_must_be_json() -> None:
    with pytest.raises(UsageError, match="not JSON-serialisable"):
        roundtrip(Message(meta={"x": object()}))


@settings(derandomize=True, max_examples=200)
@given(offset=st.integers(0, 2**64 - 1), data=st.binary(max_size=3000))
def test_chunk_codec_is_protobuf_encoding(offset: int, data: bytes) -> None:
    raw = serialize_frame(Chunk(offset, memoryview(data)))
    reference = pb.Frame(chunk=pb.TensorChunk(offset=offset, data=data))
    assert pb.Frame.FromString(raw) == reference
    parsed = parse_frame(raw)
    assert isinstance(parsed, Chunk) and parsed.offset == offset and bytes(parsed.data) == data
    # Another encoder's layout (offset 0 omitted, fields reordered) takes the protobuf path.
    assert parse_frame(reference.SerializeToString()) == Chunk(offset, data)
    reordered = pb.TensorChunk(data=data).SerializeToString() + pb.TensorChunk(offset=offset).SerializeToString()
    frame = pb.Frame(chunk=pb.TensorChunk.FromString(reordered))
    wire = b"\x1a" + _varint(len(reordered)) + reordered
    assert pb.Frame.FromString(wire) == frame
    got = parse_frame(wire)
    assert isinstance(got, Chunk) and got.offset == offset and bytes(got.data) == data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_garbage_frame_is_format_error() -> None:
    malformed = parse_frame(b"\x1a\xff\xff")
    assert isinstance(malformed, Malformed) and "frame does not parse" in malformed.reason
    with pytest.raises(FormatError, match="frame does not parse"):
        decode_message(iter([malformed]))


# --- validation of what arrives ---------------------------------------------------------


def header(count: int = 1, meta: str = "{}", version: int = 1) -> pb.Frame:
    return pb.Frame(header=pb.CallHeader(version=version, method="m", meta_json=meta, tensor_count=count))


def tensor(name: str = "t", dtype: str = "float32", shape: tuple[int, ...] = (2,), nbytes: int = 8,
           kind: str = "numpy") -> pb.Frame:  # fmt: skip
    return pb.Frame(tensor=pb.TensorHeader(version=1, name=name, dtype=dtype, shape=shape, nbytes=nbytes, kind=kind))


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([], "must start with a call header"),
        ([tensor()], "must start with a call header"),
        ([header(version=2)], "version 2 not supported"),
        ([header(meta="[1]", count=0)], "meta must be a JSON object"),
        ([header(meta="{", count=0)], "not valid JSON"),
        ([header(), tensor(dtype="object", nbytes=16)], "dtype 'object' not allowed"),
        ([header(), tensor(kind="pickle")], "kind must be one of"),
        ([header(), tensor(nbytes=9)], r"shape \(2,\) x 4 bytes = 8, header says nbytes 9"),
        ([header(), tensor(name="")], "tensor name"),
        ([header(), tensor(), Chunk(0, b"1234"), Chunk(8, b"5678")], "chunk at offset 8, expected 4"),
        ([header(), tensor(), Chunk(0, b"123456789")], "9 bytes received, declared 8"),
        ([header(), tensor(), Chunk(0, b"1234")], "stream ended after 4 of 8 bytes"),
        ([header(), Chunk(0, b"1234")], "chunk outside a tensor"),
        ([header(count=2), tensor(), Chunk(0, b"12345678"), tensor()], "sent twice"),
        ([header(count=2), tensor(), Chunk(0, b"1234"), tensor("u")], "4 of 8 bytes before next tensor"),
        ([header(count=1), tensor(), Chunk(0, b"12345678"), tensor("u")], "more tensors than the 1 declared"),
        ([header(count=2), tensor(), Chunk(0, b"12345678")], "declared 2 tensors, 1 arrived"),
        ([header(), tensor(), header()], "unexpected header frame"),
        ([header(count=0), pb.Frame()], "unexpected empty frame"),
    ],
)
def test_malformed_messages_are_refused(frames: list, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        decode_message(iter(frames))


@pytest.mark.parametrize(
    ("limits", "frames", "match"),
    [
        (Limits(max_tensors=1), [header(count=2)], "declares 2 tensors, limit 1"),
        (Limits(max_tensor_bytes=7), [header(), tensor()], "8 bytes exceeds limit 7"),
        (Limits(max_total_bytes=12), [header(count=2), tensor(), Chunk(0, b"12345678"), tensor("u")],
         "exceeds 12 tensor bytes"),
        (Limits(max_ndim=1), [header(), tensor(shape=(1, 2))], "2 dimensions, limit 1"),
        (Limits(max_meta_bytes=3), [header(meta='{"a":1}')], "meta has 7 characters, limit 3"),
    ],
)  # fmt: skip
def test_limits(limits: Limits, frames: list, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        decode_message(iter(frames), limits=limits)


def test_huge_declared_shape_is_refused_before_allocating() -> None:
    frames = [header(), tensor(shape=(2**40, 2**20), nbytes=4 * 2**60)]
    with pytest.raises(FormatError, match="exceeds limit"):
        decode_message(iter(frames))


# --- sinks --------------------------------------------------------------------------------


def test_memmap_sink_writes_files_and_removes_partial_ones(tmp_path: Path) -> None:
    value = np.arange(1000, dtype=np.float32).reshape(10, 100)
    _, got = roundtrip(
        Message(tensors={"a": value, "b": torch.ones(3, dtype=torch.bfloat16), "e": np.zeros(0)}),
        sink=MemmapSink(tmp_path),
    )
    assert isinstance(got.tensors["a"], np.memmap)
    np.testing.assert_array_equal(got.tensors["a"], value)
    assert torch.equal(got.tensors["b"], torch.ones(3, dtype=torch.bfloat16))
    assert got.tensors["e"].shape == (0,)
    assert len(list(tmp_path.iterdir())) == 3

    partial = tmp_path / "partial"
    partial.mkdir()
    with pytest.raises(FormatError):
        decode_message(iter([header(), tensor(), Chunk(0, b"1234")]), sink=MemmapSink(partial))
    assert list(partial.iterdir()) == []


def test_memmap_sink_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        MemmapSink(tmp_path / "missing")


def test_digest_sink_keeps_only_a_digest() -> None:
    value = np.random.default_rng(1).integers(0, 255, 100_000, dtype=np.uint8)
    _, got = roundtrip(Message(tensors={"x": value}), sink=DigestSink(), chunk_size=4096)
    assert got.tensors["x"] == TensorDigest("uint8", (100_000,), 100_000, "sha256", hashlib.sha256(value).hexdigest())
    with pytest.raises(UsageError, match="unknown digest"):
        DigestSink("nope")


# --- allocator tuning ---------------------------------------------------------------------

FAULTS = """
import resource, sys
from enclavefl.net.allocator import bound_allocator, tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # what a receiver does per chunk: a fresh multi-MiB buffer, then free it
    buffer = bytes(bytearray(4 << 20))
    del buffer
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_tune_allocator_keeps_chunk_buffers_for_reuse() -> None:
    runs = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        tuned, faults = out.stdout.split()
        runs[mode] = (tuned, int(faults))
    if runs["tuned"][0] == "False":
        pytest.skip("malloc is not glibc's: nothing to tune")
    assert runs["tuned"][0] == "True"
    # 50 x 4 MiB: ~1024 page faults per buffer untuned, a few in all once tuned.
    assert runs["tuned"][1] < runs["default"][1] / 10, runs


def test_tune_allocator_checks_its_thresholds() -> None:
    with pytest.raises(UsageError, match="mmap_threshold"):
        tune_allocator(mmap_threshold=64 << 20)
    with pytest.raises(UsageError, match="trim_threshold"):
        tune_allocator(mmap_threshold=1 << 20, trim_threshold=1)


KEPT = """
import ctypes, sys
from enclavefl.net.allocator import bound_allocator
bounded = bound_allocator() if sys.argv[1] == "bounded" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
size = 4 << 20
before = rss()
for _ in range(3):  # glibc raises its threshold after the first free: later ones come from the heap
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
print(bounded, rss() - before)
"""


def test_bound_allocator_returns_freed_chunk_buffers() -> None:
    kept = {}
    for mode in ("default", "bounded"):
        out = subprocess.run([sys.executable, "-c", KEPT, mode], capture_output=True, text=True, check=True)
        bounded, growth = out.stdout.split()
        kept[mode] = (bounded, int(growth))
    if kept["bounded"][0] == "False":
        pytest.skip("malloc is not glibc's: nothing to bound")
    assert kept["default"][1] >= 3 << 20, kept  # glibc's default keeps the freed buffer in the heap
    assert kept["bounded"][1] < 1 << 20, kept


def test_bound_allocator_checks_its_settings() -> None:
    with pytest.raises(UsageError, match="mmap_threshold"):
        bound_allocator(mmap_threshold=0)
    with pytest.raises(UsageError, match="arenas"):
        bound_allocator(arenas=0)
