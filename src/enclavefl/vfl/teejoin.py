"""tee-join: followers' ids go into the leader's enclave, which returns only the aligned order.

Trust: this method relies on the leader's enclave (reached over the attested channel),
which sees every follower's id set in keyed-hash form. Use `ecdh-psi` where the TEE is not
to be trusted with that.

Messages (leader L, follower F):
  L -> F  TeeJoinHello   session, order key k (fresh, random), id kind
  F -> L  TeeJoinIds     AES-256_k(BLAKE2b-128(id)) for each of F's ids, sorted by value
  L -> F  TeeJoinResult  positions, in F's sent list, of the intersection in common order

Common order: ascending AES-256_k(BLAKE2b-128(id)). It is pseudorandom, so it reveals no
party's row order (e.g. a leader whose rows are sorted by label). A follower learns which
of its own ids are in the intersection and in what order, and nothing of leader-only ids:
the result holds only positions into the follower's own list.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from enclavefl.errors import Check, Rejected, UsageError
from enclavefl.vfl.align import (
    SESSION_BYTES,
    AlignmentResult,
    IdKind,
    Ids,
    bytes_array,
    check_positions,
    check_session,
    expect_bytes,
    expect_names,
    expect_positions,
    expect_rows,
    hash_ids,
    lex_order,
    log_result,
    match_rows,
    new_session,
    positions_array,
)

TEE_JOIN = "tee-join"
ORDER_KEY_BYTES = 32
_DIGEST = 16


def _keyed(digests: np.ndarray, key: bytes) -> np.ndarray:
    # AES as a keyed permutation of each 16-byte hash: one OpenSSL call for every id
    # instead of one keyed hash per id, and a permutation cannot add collisions.
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    out = encryptor.update(digests.tobytes()) + encryptor.finalize()
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, _DIGEST)


@dataclass(frozen=True)
class TeeJoinHello:
    """Leader -> follower: the session, the order key and the leader's id kind."""

    session: bytes
    order_key: bytes
    id_kind: IdKind

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "session": bytes_array(self.session),
            "order_key": bytes_array(self.order_key),
            "id_kind": self.id_kind.wire(),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TeeJoinHello:
        what = "tee-join hello"
        expect_names(arrays, {"session", "order_key", "id_kind"}, what)
        return cls(
            session=expect_bytes(arrays, "session", SESSION_BYTES, what),
            order_key=expect_bytes(arrays, "order_key", ORDER_KEY_BYTES, what),
            id_kind=IdKind.from_wire(expect_bytes(arrays, "id_kind", 1, what), what),
        )


@dataclass(frozen=True, eq=False)
class TeeJoinIds:
    """Follower -> leader: the follower's keyed id hashes, uint8 [m, 16], sorted."""

    session: bytes
    hashed: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"session": bytes_array(self.session), "hashed": self.hashed}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TeeJoinIds:
        what = "tee-join ids"
        expect_names(arrays, {"session", "hashed"}, what)
        return cls(
            session=expect_bytes(arrays, "session", SESSION_BYTES, what),
            hashed=expect_rows(arrays, "hashed", _DIGEST, what),
        )


@dataclass(frozen=True, eq=False)
class TeeJoinResult:
    """Leader -> follower: positions in the follower's sent list, in the common order."""

    session: bytes
    positions: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"session": bytes_array(self.session), "positions": positions_array(self.positions)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TeeJoinResult:
        what = "tee-join result"
        expect_names(arrays, {"session", "positions"}, what)
        return cls(
            session=expect_bytes(arrays, "session", SESSION_BYTES, what),
            positions=expect_positions(arrays, "positions", what),
        )


class TeeJoinLeader:
    """The leader's side (runs in its enclave): joins every follower's ids with its own.

    `order_key` fixes the common order (for a reproducible re-run); by default it is fresh
    and random for each alignment.
    """

    def __init__(self, ids: Ids, followers: Sequence[str], *, order_key: bytes | None = None) -> None:
        if not followers or len(set(followers)) != len(followers):
            raise UsageError(
                f"tee-join leader: followers must be distinct names, at least one; got {list(followers)}"
            )
        if order_key is not None and len(order_key) != ORDER_KEY_BYTES:
            raise UsageError(
                f"tee-join leader: order_key must be {ORDER_KEY_BYTES} bytes, got {len(order_key)}"
            )
        self._followers = list(followers)
        self._kind, digests = hash_ids(ids, digest_size=_DIGEST)
        self._key = order_key if order_key is not None else secrets.token_bytes(ORDER_KEY_BYTES)
        self._keyed = _keyed(digests, self._key)
        self._session = new_session()
        self._received: dict[str, np.ndarray] = {}

    def hello(self) -> TeeJoinHello:
        return TeeJoinHello(self._session, self._key, self._kind)

    def receive(self, follower: str, message: TeeJoinIds) -> None:
        what = f"tee-join ids from {follower!r}"
        if follower not in self._followers:
            raise Rejected(f"{what}: not a follower of this alignment {self._followers}", check=Check.ALIGN_PEER)
        if follower in self._received:
            raise Rejected(f"{what}: this follower already sent its ids", check=Check.ALIGN_PROTOCOL)
        check_session(message.session, self._session, what)
        self._received[follower] = message.hashed

    def finish(self) -> tuple[AlignmentResult, dict[str, TeeJoinResult]]:
        """The leader's own alignment and the result message for each follower."""
        missing = [name for name in self._followers if name not in self._received]
        if missing:
            raise UsageError(f"tee-join leader: no ids yet from followers {missing}")
        n = self._keyed.shape[0]
        in_all = np.ones(n, dtype=bool)
        positions: dict[str, np.ndarray] = {}
        for name in self._followers:
            mine, theirs = match_rows(self._keyed, self._received[name], what=f"tee-join ids from {name!r}")
            position = np.full(n, -1, dtype=np.int64)
            position[mine] = theirs
            in_all &= position >= 0
            positions[name] = position
        common = np.flatnonzero(in_all)
        common = common[lex_order(self._keyed[common])]
        log_result(TEE_JOIN, "leader", common.size)
        results = {name: TeeJoinResult(self._session, positions[name][common]) for name in self._followers}
        return AlignmentResult(common), results


class TeeJoinFollower:
    """A follower's side: sends its keyed id hashes, then maps the result to its rows."""

    def __init__(self, ids: Ids) -> None:
        self._kind, self._digests = hash_ids(ids, digest_size=_DIGEST)
        self._session: bytes | None = None
        self._sent_order = np.empty(0, dtype=np.int64)

    def answer(self, hello: TeeJoinHello) -> TeeJoinIds:
        if hello.id_kind is not self._kind:
            raise UsageError(
                f"tee-join: id kind mismatch: the leader has {hello.id_kind.name.lower()} ids, "
                f"this follower has {self._kind.name.lower()} ids"
            )
        keyed = _keyed(self._digests, hello.order_key)
        self._sent_order = lex_order(keyed)
        self._session = hello.session
        return TeeJoinIds(hello.session, keyed[self._sent_order])

    def finish(self, result: TeeJoinResult) -> AlignmentResult:
        what = "tee-join result"
        if self._session is None:
            raise UsageError(f"{what}: received before the leader's hello was answered")
        check_session(result.session, self._session, what)
        check_positions(result.positions, self._sent_order.size, what)
        aligned = AlignmentResult(self._sent_order[result.positions])
        log_result(TEE_JOIN, "follower", aligned.size)
        return aligned
