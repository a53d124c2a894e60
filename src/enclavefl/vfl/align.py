"""Shared pieces of sample alignment: the result, id hashing, byte-row matching, wire checks.

Two protocols build on these: `enclavefl.vfl.teejoin` (ids go into the leader's enclave)
and `enclavefl.vfl.psi` (X25519 ECDH private set intersection). Both are transport-free
state machines: every step takes and returns a message whose `to_arrays()` is a dict of
named numpy arrays (fixed-width byte rows as uint8 [n, w], positions as uint32 [k]) that
the attested transport sends as tensors, never pickle.

Every list a party sends is sorted by its own (pseudorandom) value, so the order on the
wire carries no information about the sender's row order.

The common order the parties train in is not the protocol's: `canonical_order` sorts the
intersection by a hash of each id, so it depends on the ids alone (not on a protocol
session's random values) and every party reaches it without a message.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, Protocol, Self, cast, dataclass_transform

import numpy as np

from enclavefl.errors import Check, FormatError, Rejected, UsageError

__all__ = [
    "ID_KIND",
    "MAX_IDS",
    "ORDER_DIGEST",
    "ORDER_PERSON",
    "POSITIONS",
    "SESSION",
    "SESSION_BYTES",
    "AlignMessage",
    "AlignmentResult",
    "ByteRows",
    "FixedBytes",
    "IdKind",
    "IdKindCode",
    "Ids",
    "Positions",
    "WireKind",
    "canonical_order",
    "check_positions",
    "check_session",
    "duplicate_pair",
    "has_repeats",
    "hash_ids",
    "lex_order",
    "log_result",
    "match_rows",
    "new_session",
    "wire",
]

log = logging.getLogger(__name__)

# What a party may pass as its example ids: all str, or all int (Python or numpy).
Ids = Sequence[str] | Sequence[int] | np.ndarray

SESSION_BYTES = 16
# Positions on the wire are uint32, so one party may hold at most this many rows.
MAX_IDS = 2**32 - 1
# Python ints travel as 16-byte two's complement, so they must fit in 128 bits.
_INT_BYTES = 16
# The canonical order of an intersection: ascending BLAKE2b-128 of each id under this person.
ORDER_PERSON = b"enclavefl-order"
ORDER_DIGEST = 16


class IdKind(Enum):
    """The type of a party's ids; leader and followers must agree on it."""

    STR = 1
    INT = 2

    def wire(self) -> np.ndarray:
        return np.array([self.value], dtype=np.uint8)

    @classmethod
    def from_wire(cls, data: bytes, what: str) -> IdKind:
        code = data[0]
        try:
            return cls(code)
        except ValueError:
            raise FormatError(f"{what}: unknown id kind code {code} (expected 1=str or 2=int)") from None


def has_repeats(values: np.ndarray) -> bool:
    """Whether some value occurs twice (a sort: fast, unlike np.unique on large arrays)."""
    ordered = np.sort(values)
    return bool(np.any(ordered[1:] == ordered[:-1]))


@dataclass(frozen=True, eq=False)
class AlignmentResult:
    """This party's rows in the common order: `rows[i]` is the index, in the id list the
    party started from, of the i-th sample of the intersection. Nothing else is kept."""

    rows: np.ndarray

    _MAGIC = b"EFLALN01"

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise UsageError(f"alignment rows: expected a 1-D integer array, got {rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64)
        if rows.size and rows.min() < 0:
            raise UsageError(f"alignment rows: negative row index {int(rows.min())}")
        if has_repeats(rows):
            raise UsageError("alignment rows: a row index appears twice")
        rows.setflags(write=False)
        object.__setattr__(self, "rows", rows)

    @property
    def size(self) -> int:
        """The number of samples in the intersection."""
        return int(self.rows.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AlignmentResult):
            return NotImplemented
        return bool(np.array_equal(self.rows, other.rows))

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """A fixed layout (magic, count, little-endian int64 rows) for sealed storage."""
        return self._MAGIC + struct.pack("<Q", self.size) + self.rows.astype("<i8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> AlignmentResult:
        header = len(cls._MAGIC) + 8
        if len(data) < header or data[: len(cls._MAGIC)] != cls._MAGIC:
            raise FormatError(f"alignment result: bad magic {data[:8]!r}, expected {cls._MAGIC!r}")
        (count,) = struct.unpack_from("<Q", data, len(cls._MAGIC))
        if len(data) != header + 8 * count:
            raise FormatError(
                f"alignment result: {len(data)} bytes, expected {header + 8 * count} for {count} rows"
            )
        rows = np.frombuffer(data, dtype="<i8", offset=header).astype(np.int64)
        try:
            return cls(rows)
        except UsageError as exc:
            raise FormatError(str(exc)) from None


# --- ids -------------------------------------------------------------------------------


def _int_rows(array: np.ndarray) -> np.ndarray:
    """Integers as 16-byte little-endian two's complement rows, without a Python loop."""
    low = array.astype("<i8" if array.dtype.kind == "i" else "<u8")
    rows = np.zeros((array.size, _INT_BYTES), dtype=np.uint8)
    rows[:, :8] = low.view(np.uint8).reshape(-1, 8)
    if array.dtype.kind == "i":
        rows[low < 0, 8:] = 0xFF
    return rows


def _category(value: object) -> IdKind | None:
    if isinstance(value, str):
        return IdKind.STR
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return IdKind.INT
    return None


def _canonical(ids: Ids) -> tuple[IdKind, list[str] | list[bytes]]:
    """Check the ids' type: str ids as they are (UTF-8 encoded when hashed), int ids as
    16-byte little-endian two's complement."""
    if isinstance(ids, (str, bytes)):
        raise UsageError("ids: expected a sequence of ids, got a single str/bytes value")
    if isinstance(ids, np.ndarray) and ids.ndim != 1:
        raise UsageError(f"ids: expected a 1-D array, got shape {ids.shape}")
    if len(ids) == 0:
        raise UsageError("ids: the party has no ids (empty set); alignment needs at least one")
    if len(ids) > MAX_IDS:
        raise UsageError(f"ids: {len(ids)} ids, at most {MAX_IDS} are supported")
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind in "iu":
            blob = _int_rows(ids).tobytes()
            return IdKind.INT, [blob[i : i + _INT_BYTES] for i in range(0, len(blob), _INT_BYTES)]
        if ids.dtype.kind not in "UO":
            raise UsageError(f"ids: unsupported array dtype {ids.dtype} (use str or integer ids)")
        ids = ids.tolist()
    types = set(map(type, ids))
    if all(issubclass(t, str) for t in types):
        return IdKind.STR, cast(list[str], list(ids))
    if all(issubclass(t, (int, np.integer)) and not issubclass(t, (bool, np.bool_)) for t in types):
        try:
            return IdKind.INT, [int(x).to_bytes(_INT_BYTES, "little", signed=True) for x in ids]
        except OverflowError:
            raise UsageError("ids: an integer id does not fit in 128 bits") from None
    first = _category(ids[0])
    if first is None:
        raise UsageError(f"ids: row 0 is {type(ids[0]).__name__}; ids must be all str or all int")
    bad = next(i for i, value in enumerate(ids) if _category(value) is not first)
    raise UsageError(
        f"ids: mixed id types: row 0 is {type(ids[0]).__name__}, row {bad} is "
        f"{type(ids[bad]).__name__} (all ids of a party must be str, or all int)"
    )


def hash_ids(ids: Ids, *, digest_size: int, person: bytes = b"") -> tuple[IdKind, np.ndarray]:
    """Validate a party's ids and BLAKE2b-hash each to `digest_size` bytes: uint8 [n, size].

    Duplicate ids are refused (UsageError naming the two rows, never the id itself).
    """
    kind, values = _canonical(ids)
    hasher = functools.partial(hashlib.blake2b, digest_size=digest_size, person=person)
    if kind is IdKind.STR:
        try:
            blob = b"".join([hasher(value.encode()).digest() for value in cast(list[str], values)])
        except UnicodeEncodeError as exc:
            raise UsageError(f"ids: an id is not valid Unicode text ({exc.reason})") from None
    else:
        blob = b"".join([hasher(value).digest() for value in cast(list[bytes], values)])
    digests = np.frombuffer(blob, dtype=np.uint8).reshape(-1, digest_size)
    first, second = duplicate_pair(digests)
    if first >= 0:
        raise UsageError(
            f"ids: duplicate id at rows {first} and {second} (ids must be unique within a party)"
        )
    return kind, digests


def canonical_order(result: AlignmentResult, ids: Ids) -> AlignmentResult:
    """`result` reordered canonically: by ascending BLAKE2b-128 (person `ORDER_PERSON`) of each
    aligned row's id, str ids UTF-8 encoded, int ids as 16-byte little-endian two's complement.

    Each party knows the ids of its aligned rows (they are the intersection) and equal ids
    hash equally, so every party reaches the same order; it depends on the ids only, not on
    the order the alignment protocol returned, which differs from one alignment to the next.
    So a seeded validation split and batch order over it are the same in every run.
    """
    if result.size == 0:
        return result
    own = ids[result.rows] if isinstance(ids, np.ndarray) else cast(Ids, [ids[int(row)] for row in result.rows])
    _, digests = hash_ids(own, digest_size=ORDER_DIGEST, person=ORDER_PERSON)
    return AlignmentResult(result.rows[lex_order(digests)])


# --- fixed-width byte rows ---------------------------------------------------------------


def _prefix(rows: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each row as a big-endian integer, so integer order is byte order."""
    return np.ascontiguousarray(rows[:, :8]).view(">u8").ravel().astype(np.uint64)


def lex_order(rows: np.ndarray) -> np.ndarray:
    """Argsort of uint8 [n, w] rows in lexicographic byte order (w a multiple of 8)."""
    prefix = _prefix(rows)
    order = np.argsort(prefix)
    sorted_prefix = prefix[order]
    ties = np.flatnonzero(sorted_prefix[1:] == sorted_prefix[:-1])
    if (rows[order[ties]] == rows[order[ties + 1]]).all():
        return order  # no ties, or ties only between equal rows (as when matching two sets)
    # Distinct rows sharing a 64-bit prefix are rare for hashes; only then sort on every word.
    words = np.ascontiguousarray(rows).view(">u8").astype(np.uint64)
    return np.lexsort(tuple(words[:, k] for k in reversed(range(words.shape[1]))))


def _equal_neighbours(rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Positions p in `order` where rows[order[p]] == rows[order[p + 1]]."""
    prefix = _prefix(rows)[order]
    candidates = np.flatnonzero(prefix[1:] == prefix[:-1])
    same = (rows[order[candidates]] == rows[order[candidates + 1]]).all(axis=1)
    return candidates[same]


def duplicate_pair(rows: np.ndarray) -> tuple[int, int]:
    """Indices (i < j) of two equal rows, or (-1, -1) when all rows differ."""
    order = lex_order(rows)
    hits = _equal_neighbours(rows, order)
    if hits.size == 0:
        return -1, -1
    a, b = sorted((int(order[hits[0]]), int(order[hits[0] + 1])))
    return a, b


def match_rows(left: np.ndarray, right: np.ndarray, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) with left[i] == right[j], in no particular order.

    Each side must hold distinct rows; a side with a repeated row (only a faulty or hostile
    peer can send one) is refused with `Rejected(check="align-duplicates")`.
    """
    both = np.concatenate([left, right])
    order = lex_order(both)
    hits = _equal_neighbours(both, order)
    first, second = order[hits], order[hits + 1]
    lo, hi = np.minimum(first, second), np.maximum(first, second)
    n = left.shape[0]
    if np.any(hi < n) or np.any(lo >= n):
        side = "first" if np.any(hi < n) else "second"
        raise Rejected(f"{what}: the {side} list repeats a value", check=Check.ALIGN_DUPLICATES)
    return lo, hi - n


# --- messages ------------------------------------------------------------------------------


def new_session() -> bytes:
    return secrets.token_bytes(SESSION_BYTES)


def expect_names(arrays: Mapping[str, Any], names: set[str], what: str) -> None:
    got = set(arrays)
    if got != names:
        raise FormatError(f"{what}: tensors {sorted(got)}, expected {sorted(names)}")


def expect_rows(arrays: Mapping[str, Any], name: str, width: int, what: str) -> np.ndarray:
    """A uint8 [n, width] tensor (n may be 0 only where the caller allows it)."""
    array = np.asarray(arrays[name])
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != width:
        raise FormatError(
            f"{what}: tensor {name!r} is {array.dtype} {array.shape}, expected uint8 (n, {width})"
        )
    if array.shape[0] > MAX_IDS:
        raise FormatError(f"{what}: tensor {name!r} has {array.shape[0]} rows, at most {MAX_IDS}")
    return np.ascontiguousarray(array)


def expect_bytes(arrays: Mapping[str, Any], name: str, size: int, what: str) -> bytes:
    array = np.asarray(arrays[name])
    if array.dtype != np.uint8 or array.shape != (size,):
        raise FormatError(f"{what}: tensor {name!r} is {array.dtype} {array.shape}, expected uint8 ({size},)")
    return array.tobytes()


def expect_positions(arrays: Mapping[str, Any], name: str, what: str) -> np.ndarray:
    array = np.asarray(arrays[name])
    if array.dtype != np.dtype("<u4") or array.ndim != 1:
        raise FormatError(f"{what}: tensor {name!r} is {array.dtype} {array.shape}, expected uint32 (k,)")
    return array.astype(np.int64)


def bytes_array(value: bytes) -> np.ndarray:
    return np.frombuffer(value, dtype=np.uint8).copy()


def positions_array(positions: np.ndarray) -> np.ndarray:
    return np.asarray(positions, dtype="<u4")


# --- declarative messages ------------------------------------------------------------------


class WireKind(Protocol):
    """How one field of an alignment message travels: encoded to, and checked from, one tensor."""

    def encode(self, value: Any) -> np.ndarray: ...

    def decode(self, arrays: Mapping[str, Any], name: str, what: str) -> Any: ...


@dataclass(frozen=True)
class FixedBytes:
    """`bytes` of exactly `size` bytes, as uint8 [size]."""

    size: int

    def encode(self, value: bytes) -> np.ndarray:
        return bytes_array(value)

    def decode(self, arrays: Mapping[str, Any], name: str, what: str) -> bytes:
        return expect_bytes(arrays, name, self.size, what)


@dataclass(frozen=True)
class ByteRows:
    """Fixed-width byte rows, uint8 [n, width], sent as they are."""

    width: int

    def encode(self, value: np.ndarray) -> np.ndarray:
        return value

    def decode(self, arrays: Mapping[str, Any], name: str, what: str) -> np.ndarray:
        return expect_rows(arrays, name, self.width, what)


class Positions:
    """Row positions, int64 in memory, uint32 [k] on the wire."""

    def encode(self, value: np.ndarray) -> np.ndarray:
        return positions_array(value)

    def decode(self, arrays: Mapping[str, Any], name: str, what: str) -> np.ndarray:
        return expect_positions(arrays, name, what)


class IdKindCode:
    """An IdKind as its one-byte code, uint8 [1]."""

    def encode(self, value: IdKind) -> np.ndarray:
        return value.wire()

    def decode(self, arrays: Mapping[str, Any], name: str, what: str) -> IdKind:
        return IdKind.from_wire(expect_bytes(arrays, name, 1, what), what)


def wire(kind: WireKind) -> Any:
    """A message field that travels as `kind` (a dataclass field; declaration order is wire order)."""
    return field(metadata={"wire": kind})


SESSION = FixedBytes(SESSION_BYTES)
ID_KIND = IdKindCode()
POSITIONS = Positions()


@dataclass_transform(frozen_default=True, eq_default=False, field_specifiers=(field, wire))
class AlignMessage:
    """Base of the alignment messages: each subclass is a frozen dataclass (compared by
    identity: fields hold arrays) whose fields all declare a wire kind, named by `what`:

        class TeeJoinIds(AlignMessage, what="tee-join ids"):
            session: bytes = wire(SESSION)
            hashed: np.ndarray = wire(ByteRows(16))

    `to_arrays()` is one tensor per field, by field name; `from_arrays()` refuses any other
    set of names and checks each tensor (FormatError naming `what`, the field and the shape).
    """

    WHAT: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __init_subclass__(cls, *, what: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.WHAT = what
        dataclass(frozen=True, eq=False)(cls)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {spec.name: spec.metadata["wire"].encode(getattr(self, spec.name)) for spec in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Self:
        kinds: dict[str, WireKind] = {spec.name: spec.metadata["wire"] for spec in fields(cls)}
        expect_names(arrays, set(kinds), cls.WHAT)
        return cls(**{name: kind.decode(arrays, name, cls.WHAT) for name, kind in kinds.items()})


def check_session(got: bytes, expected: bytes, what: str) -> None:
    if got != expected:
        raise Rejected(f"{what}: the message belongs to another alignment session", check=Check.ALIGN_SESSION)


def check_followers(followers: Sequence[str], method: str) -> list[str]:
    """A leader's followers: distinct names, at least one."""
    if not followers or len(set(followers)) != len(followers):
        raise UsageError(f"{method} leader: followers must be distinct names, at least one; got {list(followers)}")
    return list(followers)


def check_sender(
    follower: str, followers: Sequence[str], received: Mapping[str, Any], what: str, *, answer: str
) -> None:
    """A follower's `answer` to the leader: from one of its followers, the first from it."""
    if follower not in followers:
        raise Rejected(f"{what}: not a follower of this alignment {list(followers)}", check=Check.ALIGN_PEER)
    if follower in received:
        raise Rejected(f"{what}: this follower already sent its {answer}", check=Check.ALIGN_PROTOCOL)


def check_all_answered(followers: Sequence[str], received: Mapping[str, Any], method: str, *, answer: str) -> None:
    """The leader finishes only once every follower sent its `answer` (a caller's mistake otherwise)."""
    missing = [name for name in followers if name not in received]
    if missing:
        raise UsageError(f"{method} leader: no {answer} yet from followers {missing}")


def check_id_kind(leader: IdKind, own: IdKind, method: str) -> None:
    """Leader and follower ids must be of one kind (str ids never equal int ids)."""
    if leader is not own:
        raise UsageError(
            f"{method}: id kind mismatch: the leader has {leader.name.lower()} ids, "
            f"this follower has {own.name.lower()} ids"
        )


def check_answered_session(got: bytes, answered: bytes | None, what: str) -> None:
    """The leader's last message belongs to the session whose hello this follower answered."""
    if answered is None:
        raise UsageError(f"{what}: received before the leader's hello was answered")
    check_session(got, answered, what)


def check_positions(positions: np.ndarray, count: int, what: str) -> None:
    """Positions into a list of `count` rows must be in range and distinct."""
    if positions.size and (positions.min() < 0 or positions.max() >= count):
        raise Rejected(
            f"{what}: a position is outside the {count} rows this party sent", check=Check.ALIGN_RESULT
        )
    if has_repeats(positions):
        raise Rejected(f"{what}: a position appears twice", check=Check.ALIGN_RESULT)


def log_result(method: str, role: str, size: int) -> None:
    """Log the one thing alignment may log: the intersection size."""
    if size == 0:
        log.warning("%s %s: the intersection is empty; there is nothing to train on", method, role)
    else:
        log.info("%s %s: intersection of %d samples", method, role, size)
