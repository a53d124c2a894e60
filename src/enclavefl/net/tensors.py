"""Named tensors on the wire: typed raw little-endian buffers in chunks, never pickle.

A message is a JSON `meta` object plus named tensors. On the wire it is one `CallHeader`
frame, then for each tensor a `TensorHeader` frame and its bytes in `TensorChunk` frames
of at most `chunk_size` bytes. The receiver validates every frame and hands the bytes of
each tensor to a sink, so a tensor far above the 2 GiB protobuf limit passes with memory
bounded by one chunk when the sink is a file or a digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from google.protobuf.message import DecodeError

from enclavefl.errors import FormatError, UsageError
from enclavefl.net import enclavefl_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DTYPES",
    "KINDS",
    "PROTOCOL_VERSION",
    "ArraySink",
    "Chunk",
    "DigestSink",
    "Frame",
    "LazyTensor",
    "Limits",
    "Malformed",
    "MemmapSink",
    "Message",
    "TensorDigest",
    "TensorSink",
    "TensorSpec",
    "TensorWriter",
    "decode_message",
    "encode_message",
    "parse_frame",
    "serialize_frame",
]

PROTOCOL_VERSION = 1
DEFAULT_CHUNK_SIZE = 4 << 20

# Wire dtype name -> little-endian numpy storage dtype. bfloat16 travels as its raw 16 bits.
_STORAGE: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "bool": "|b1",
        "int8": "|i1",
        "uint8": "|u1",
        "int16": "<i2",
        "uint16": "<u2",
        "int32": "<i4",
        "uint32": "<u4",
        "int64": "<i8",
        "uint64": "<u8",
        "float16": "<f2",
        "bfloat16": "<u2",
        "float32": "<f4",
        "float64": "<f8",
        "complex64": "<c8",
        "complex128": "<c16",
    }.items()
}
DTYPES: frozenset[str] = frozenset(_STORAGE)
KINDS = ("numpy", "torch")


def _torch() -> Any:
    import torch  # torch is an optional extra: numpy-only parties never import it

    return torch


def _is_torch(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype")


@dataclass(frozen=True)
class Malformed:
    """What a deserializer returns for bytes it refuses: gRPC logs a traceback for an
    exception there, so the refusal is made by the code that reads the request."""

    reason: str


@dataclass(frozen=True)
class Limits:
    """Bounds a receiver enforces on every message (defence against a hostile peer)."""

    max_tensors: int = 100_000
    max_tensor_bytes: int = 64 << 30
    max_total_bytes: int = 64 << 30
    max_ndim: int = 32
    max_name_chars: int = 1024
    max_meta_bytes: int = 16 << 20


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor header declares: validated before any byte is accepted."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str = "numpy"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _STORAGE[self.dtype].itemsize

    @property
    def storage_dtype(self) -> np.dtype:
        return _STORAGE[self.dtype]


@dataclass(frozen=True)
class LazyTensor:
    """A tensor produced chunk by chunk while it is sent (e.g. larger than memory).

    `chunks` is called once per send attempt and yields bytes-like pieces whose total is
    exactly the tensor's size; a retried call calls it again.
    """

    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[Any]]
    kind: str = "numpy"


@dataclass(frozen=True)
class TensorDigest:
    """What `DigestSink` keeps of a received tensor."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    algorithm: str
    hexdigest: str


@dataclass
class Message:
    """A request or response: JSON-serialisable `meta` and named tensors.

    Tensor values to send: numpy arrays, torch tensors (any device; copied to CPU) or
    `LazyTensor`. Received values: what the sink made; the default sink returns a numpy
    array, or a torch tensor when the sender sent one. bfloat16 always arrives as a torch
    tensor, since numpy has no bfloat16.
    """

    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)

    def numpy(self, name: str) -> np.ndarray:
        value = self.tensors[name]
        if _is_torch(value):
            if value.dtype == _torch().bfloat16:
                raise UsageError(f"tensor {name!r} is bfloat16, which numpy cannot hold: use .torch()")
            return value.numpy()  # type: ignore[no-any-return]
        return np.asarray(value)

    def torch(self, name: str) -> Any:
        value = self.tensors[name]
        return value if _is_torch(value) else _torch().from_numpy(np.asarray(value))


# --- frame codec ---------------------------------------------------------------------
#
# upb serializes a frame with a multi-MiB bytes field at a few hundred MB/s, so chunk frames
# bypass it: `serialize_frame` writes the exact protobuf encoding of
# Frame{chunk: TensorChunk{offset, data}} around the data in one join, and `parse_frame`
# slices the data out of the received buffer without copying. Anything not in that exact
# layout (other frames, other encoders' field orders) goes through protobuf.


@dataclass(frozen=True, slots=True)
class Chunk:
    """A TensorChunk frame: `data` may be a view into the sender's tensor or the receive buffer."""

    offset: int
    data: bytes | memoryview


Frame = pb.Frame | Chunk

_CHUNK_FRAME_TAG = 0x1A  # Frame.chunk: field 3, length-delimited
_OFFSET_TAG = 0x08  # TensorChunk.offset: field 1, varint
_DATA_TAG = 0x12  # TensorChunk.data: field 2, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return None


def serialize_frame(frame: Frame) -> bytes:
    if isinstance(frame, Chunk):
        inner = bytes((_OFFSET_TAG,)) + _varint(frame.offset) + bytes((_DATA_TAG,)) + _varint(len(frame.data))
        prefix = bytes((_CHUNK_FRAME_TAG,)) + _varint(len(inner) + len(frame.data)) + inner
        return b"".join((prefix, frame.data))
    return frame.SerializeToString()  # type: ignore[no-any-return]


def _fast_chunk(raw: bytes) -> Chunk | None:
    if not raw or raw[0] != _CHUNK_FRAME_TAG:
        return None
    head = _read_varint(raw, 1)
    if head is None or head[0] != len(raw) - head[1]:
        return None
    pos = head[1]
    offset = 0
    if pos < len(raw) and raw[pos] == _OFFSET_TAG:
        parsed = _read_varint(raw, pos + 1)
        if parsed is None:
            return None
        offset, pos = parsed
    if pos >= len(raw) or raw[pos] != _DATA_TAG:
        return None
    size = _read_varint(raw, pos + 1)
    if size is None or size[0] != len(raw) - size[1]:
        return None
    return Chunk(offset, memoryview(raw)[size[1] :])


def parse_frame(raw: bytes) -> Frame | Malformed:
    """A frame from its bytes; Malformed (never an exception: gRPC would log a traceback for
    it) when they do not parse, for `decode_message` to refuse."""
    chunk = _fast_chunk(raw)
    if chunk is not None:
        return chunk
    try:
        frame = pb.Frame.FromString(raw)
    except DecodeError as exc:
        return Malformed(f"frame does not parse: {exc}")
    if frame.WhichOneof("kind") == "chunk":
        return Chunk(frame.chunk.offset, frame.chunk.data)
    return frame  # type: ignore[no-any-return]


# --- sending -------------------------------------------------------------------------


def _spec_of(name: Any, value: Any) -> TensorSpec:
    """What `value` will be declared as; checked before anything is sent."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"tensor names must be non-empty strings, got {name!r}")
    if isinstance(value, LazyTensor):
        spec = TensorSpec(name, value.dtype, tuple(int(d) for d in value.shape), value.kind)
        if spec.dtype not in DTYPES:
            raise UsageError(f"tensor {name!r}: dtype {spec.dtype!r} not allowed; allowed: {sorted(DTYPES)}")
        if spec.kind not in KINDS:
            raise UsageError(f"tensor {name!r}: kind must be one of {KINDS}, got {spec.kind!r}")
        if any(d < 0 for d in spec.shape):
            raise UsageError(f"tensor {name!r}: negative dimension in shape {spec.shape}")
        return spec
    if _is_torch(value):
        if value.layout != _torch().strided:
            raise UsageError(f"tensor {name!r}: only dense tensors can be sent, got {value.layout}")
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise UsageError(f"tensor {name!r}: dtype {dtype} cannot be sent; allowed: {sorted(DTYPES)}")
        return TensorSpec(name, dtype, tuple(value.shape), "torch")
    if isinstance(value, np.ndarray):
        if value.dtype.name not in DTYPES:
            raise UsageError(f"tensor {name!r}: dtype {value.dtype} cannot be sent; allowed: {sorted(DTYPES)}")
        return TensorSpec(name, value.dtype.name, tuple(value.shape), "numpy")
    raise UsageError(f"tensor {name!r}: expected a numpy array, torch tensor or LazyTensor, got {type(value).__name__}")


def _pieces(spec: TensorSpec, value: Any) -> Iterable[Any]:
    """The tensor's bytes: lazily produced, or one flat view of its (contiguous) memory."""
    if isinstance(value, LazyTensor):
        return value.chunks()
    if _is_torch(value):
        torch = _torch()
        t = value.detach().resolve_conj().resolve_neg().cpu().contiguous()
        array = t.view(torch.int16).numpy() if spec.dtype == "bfloat16" else t.numpy()
    else:
        array = np.ascontiguousarray(value, dtype=spec.storage_dtype)  # copies only if needed
    return (array.reshape(-1).view(np.uint8),) if array.size else ()


def _chunk_frames(pieces: Iterable[Any], nbytes: int, chunk_size: int, name: str) -> Iterator[Frame]:
    offset = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        if offset + len(view) > nbytes:
            raise UsageError(f"tensor {name!r}: producer yielded more than the declared {nbytes} bytes")
        for start in range(0, len(view), chunk_size):
            data = view[start : start + chunk_size]  # a view: the only copy is the frame's
            yield Chunk(offset, data)
            offset += len(data)
    if offset != nbytes:
        raise UsageError(f"tensor {name!r}: producer yielded {offset} bytes, declared {nbytes}")


def encode_message(message: Message, *, method: str = "", chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[Frame]:
    """The frames of `message`. Names, dtypes and meta are checked now (UsageError);
    tensor bytes are read only while the frames are consumed."""
    if chunk_size <= 0:
        raise UsageError(f"chunk_size must be positive, got {chunk_size}")
    if not isinstance(message.meta, dict):
        raise UsageError(f"message meta must be a dict, got {type(message.meta).__name__}")
    try:
        meta_json = json.dumps(message.meta, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"message meta is not JSON-serialisable: {exc}") from exc
    tensors = [(_spec_of(name, value), value) for name, value in message.tensors.items()]
    header = pb.CallHeader(version=PROTOCOL_VERSION, method=method, meta_json=meta_json, tensor_count=len(tensors))
    return _frames(header, tensors, chunk_size)


def _frames(header: pb.CallHeader, tensors: list[tuple[TensorSpec, Any]], chunk_size: int) -> Iterator[Frame]:
    yield pb.Frame(header=header)
    for spec, value in tensors:
        yield pb.Frame(
            tensor=pb.TensorHeader(
                version=PROTOCOL_VERSION,
                name=spec.name,
                dtype=spec.dtype,
                shape=spec.shape,
                nbytes=spec.nbytes,
                kind=spec.kind,
            )
        )
        yield from _chunk_frames(_pieces(spec, value), spec.nbytes, chunk_size, spec.name)


# --- receiving -----------------------------------------------------------------------


class TensorWriter(Protocol):
    """Receives one tensor's bytes in order; `close` returns the value for the message."""

    def write(self, data: bytes | memoryview) -> None: ...

    def close(self) -> Any: ...

    def abort(self) -> None: ...


class TensorSink(Protocol):
    """Where received tensors go. Sinks are shared by concurrent calls: keep them stateless."""

    def open(self, spec: TensorSpec) -> TensorWriter: ...


def _as_kind(array: np.ndarray, spec: TensorSpec) -> Any:
    if spec.dtype == "bfloat16":
        torch = _torch()
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    if spec.kind == "torch":
        return _torch().from_numpy(array)
    return array


class _ArrayWriter:
    # The buffer grows with the bytes that arrive instead of being allocated at the header:
    # a peer that declares a huge tensor and sends nothing costs nothing. (A large bytearray
    # grows by realloc, which moves pages rather than copying them.)
    def __init__(self, spec: TensorSpec) -> None:
        self._spec = spec
        self._buffer = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self._buffer += data

    def close(self) -> Any:
        flat = np.frombuffer(self._buffer, dtype=self._spec.storage_dtype)
        return _as_kind(flat.reshape(self._spec.shape), self._spec)

    def abort(self) -> None:
        self._buffer = bytearray()


class ArraySink:
    """Default sink: allocate the array, fill it as chunks arrive."""

    def open(self, spec: TensorSpec) -> TensorWriter:
        return _ArrayWriter(spec)


class _FileWriter:
    def __init__(self, spec: TensorSpec, directory: Path) -> None:
        self._spec = spec
        # The wire name is untrusted: it never becomes part of a path.
        fd, path = tempfile.mkstemp(dir=directory, prefix="tensor-", suffix=".bin")
        self._file = os.fdopen(fd, "wb")  # buffered: writes are never partial
        self.path = Path(path)

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)

    def close(self) -> Any:
        self._file.close()
        if self._spec.nbytes == 0:  # mmap cannot map an empty file
            return _as_kind(np.empty(self._spec.shape, dtype=self._spec.storage_dtype), self._spec)
        array = np.memmap(self.path, dtype=self._spec.storage_dtype, mode="r+", shape=self._spec.shape)
        return _as_kind(array, self._spec)

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class MemmapSink:
    """Writes each tensor to a new file in `directory` and returns an `np.memmap` of it.

    Writes go through the file, not the mapping, so the receiver's memory stays bounded by
    one chunk. The files belong to the caller (delete them, or the directory, when done).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UsageError(f"memmap sink directory does not exist: {self.directory}")

    def open(self, spec: TensorSpec) -> TensorWriter:
        return _FileWriter(spec, self.directory)


class _DigestWriter:
    def __init__(self, spec: TensorSpec, algorithm: str) -> None:
        self._spec = spec
        self._hash = hashlib.new(algorithm)

    def write(self, data: bytes | memoryview) -> None:
        self._hash.update(data)

    def close(self) -> TensorDigest:
        s = self._spec
        return TensorDigest(s.dtype, s.shape, s.nbytes, self._hash.name, self._hash.hexdigest())

    def abort(self) -> None:
        return None


class DigestSink:
    """Keeps only a streaming digest of each tensor (verification of huge transfers)."""

    def __init__(self, algorithm: str = "sha256") -> None:
        if algorithm not in hashlib.algorithms_available:
            raise UsageError(f"unknown digest algorithm {algorithm!r}")
        self.algorithm = algorithm

    def open(self, spec: TensorSpec) -> TensorWriter:
        return _DigestWriter(spec, self.algorithm)


def _header_spec(frame: pb.TensorHeader, limits: Limits) -> TensorSpec:
    if frame.version != PROTOCOL_VERSION:
        raise FormatError(f"tensor header version {frame.version} not supported (expected {PROTOCOL_VERSION})")
    if not frame.name or len(frame.name) > limits.max_name_chars:
        raise FormatError(f"tensor name must have 1..{limits.max_name_chars} characters, got {len(frame.name)}")
    if frame.dtype not in DTYPES:
        raise FormatError(f"tensor {frame.name!r}: dtype {frame.dtype!r} not allowed; allowed: {sorted(DTYPES)}")
    if frame.kind not in KINDS:
        raise FormatError(f"tensor {frame.name!r}: kind must be one of {KINDS}, got {frame.kind!r}")
    if len(frame.shape) > limits.max_ndim:
        raise FormatError(f"tensor {frame.name!r}: {len(frame.shape)} dimensions, limit {limits.max_ndim}")
    spec = TensorSpec(frame.name, frame.dtype, tuple(frame.shape), frame.kind)
    if spec.nbytes != frame.nbytes:
        raise FormatError(
            f"tensor {frame.name!r}: shape {spec.shape} x {spec.storage_dtype.itemsize} bytes = {spec.nbytes},"
            f" header says nbytes {frame.nbytes}"
        )
    if spec.nbytes > limits.max_tensor_bytes:
        raise FormatError(f"tensor {frame.name!r}: {spec.nbytes} bytes exceeds limit {limits.max_tensor_bytes}")
    # A zero dimension makes any other dimension "fit" (shape (0, 2**63) is 0 bytes), but
    # no array library can hold it: each dimension must fit the limit on its own.
    largest = math.prod(max(d, 1) for d in spec.shape) * spec.storage_dtype.itemsize
    if largest > limits.max_tensor_bytes:
        raise FormatError(f"tensor {frame.name!r}: shape {spec.shape} exceeds limit {limits.max_tensor_bytes} bytes")
    return spec


def decode_message(
    frames: Iterator[Frame], *, sink: TensorSink | None = None, limits: Limits = Limits()
) -> tuple[str, Message]:
    """Read one message from `frames`, validating each frame; returns (method, message).

    Raises FormatError on anything malformed; the partial tensor's writer is aborted.
    """
    sink = sink or ArraySink()
    head = _call_header(next(frames, None), limits)
    reader = _MessageReader(Message(meta=_message_meta(head.meta_json, limits)), head.tensor_count, sink, limits)
    try:
        for frame in frames:
            reader.feed(frame)
        return head.method, reader.finish()
    finally:
        reader.abort()


def _call_header(frame: Frame | Malformed | None, limits: Limits) -> pb.CallHeader:
    """The call header every message starts with, within the limits."""
    if isinstance(frame, Malformed):
        raise FormatError(frame.reason)
    if not isinstance(frame, pb.Frame) or frame.WhichOneof("kind") != "header":
        raise FormatError("message must start with a call header")
    head = frame.header
    if head.version != PROTOCOL_VERSION:
        raise FormatError(f"call header version {head.version} not supported (expected {PROTOCOL_VERSION})")
    if head.tensor_count > limits.max_tensors:
        raise FormatError(f"message declares {head.tensor_count} tensors, limit {limits.max_tensors}")
    if len(head.meta_json) > limits.max_meta_bytes:
        raise FormatError(f"message meta has {len(head.meta_json)} characters, limit {limits.max_meta_bytes}")
    return head


def _message_meta(meta_json: str, limits: Limits) -> dict[str, Any]:
    """The message's meta: a JSON object (empty when none was sent)."""
    try:
        meta = json.loads(meta_json) if meta_json else {}
    except ValueError as exc:  # also integers too long to convert
        raise FormatError(f"message meta is not valid JSON: {exc}") from exc
    except RecursionError:
        raise FormatError("message meta is nested too deeply") from None
    if not isinstance(meta, dict):
        raise FormatError(f"message meta must be a JSON object, got {type(meta).__name__}")
    return meta


class _MessageReader:
    """The tensors of one message, frame by frame: each tensor's header, then its chunks in
    order, into a writer from the sink; never more tensors or bytes than declared or allowed."""

    def __init__(self, message: Message, declared: int, sink: TensorSink, limits: Limits) -> None:
        self.message = message
        self._declared = declared
        self._sink = sink
        self._limits = limits
        self._spec: TensorSpec | None = None
        self._writer: TensorWriter | None = None
        self._received = 0
        self._total = 0

    def feed(self, frame: Frame | Malformed) -> None:
        if isinstance(frame, Malformed):
            raise FormatError(frame.reason)
        if isinstance(frame, Chunk):
            self._write(frame)
        elif frame.WhichOneof("kind") == "tensor":
            self._close_tensor("{received} of {nbytes} bytes before next tensor")
            self._open_tensor(frame.tensor)
        else:
            raise FormatError(f"unexpected {frame.WhichOneof('kind') or 'empty'} frame inside a message")

    def finish(self) -> Message:
        """The whole message, once the stream has ended: every declared tensor complete."""
        self._close_tensor("stream ended after {received} of {nbytes} bytes")
        if len(self.message.tensors) != self._declared:
            raise FormatError(f"message declared {self._declared} tensors, {len(self.message.tensors)} arrived")
        return self.message

    def abort(self) -> None:
        """Drop a partly received tensor (nothing to do after `finish`)."""
        if self._writer is not None:
            self._writer.abort()

    def _write(self, chunk: Chunk) -> None:
        spec, writer = self._spec, self._writer
        if spec is None or writer is None:
            raise FormatError("tensor chunk outside a tensor")
        if chunk.offset != self._received:
            raise FormatError(f"tensor {spec.name!r}: chunk at offset {chunk.offset}, expected {self._received}")
        if self._received + len(chunk.data) > spec.nbytes:
            raise FormatError(
                f"tensor {spec.name!r}: {self._received + len(chunk.data)} bytes received, declared {spec.nbytes}"
            )
        writer.write(chunk.data)
        self._received += len(chunk.data)

    def _close_tensor(self, incomplete: str) -> None:
        """Add the tensor being received to the message; `incomplete` explains a short one."""
        spec = self._spec
        if spec is None:
            return
        if self._writer is None or self._received != spec.nbytes:
            detail = incomplete.format(received=self._received, nbytes=spec.nbytes)
            raise FormatError(f"tensor {spec.name!r}: {detail}")
        self.message.tensors[spec.name] = self._writer.close()
        self._writer = None

    def _open_tensor(self, header: pb.TensorHeader) -> None:
        spec = _header_spec(header, self._limits)
        if spec.name in self.message.tensors:
            raise FormatError(f"tensor {spec.name!r} sent twice")
        if len(self.message.tensors) >= self._declared:
            raise FormatError(f"more tensors than the {self._declared} declared")
        self._total += spec.nbytes
        if self._total > self._limits.max_total_bytes:
            raise FormatError(f"message exceeds {self._limits.max_total_bytes} tensor bytes")
        self._spec = spec
        self._writer = self._sink.open(spec)
        self._received = 0
