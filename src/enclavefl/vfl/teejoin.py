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
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from enclavefl.errors import UsageError
from enclavefl.vfl.align import ID_KIND, POSITIONS, SESSION, AlignmentResult, AlignMessage, ByteRows, FixedBytes
from enclavefl.vfl.align import IdKind, Ids, wire
from enclavefl.vfl.align import check_all_answered, check_answered_session, check_followers, check_id_kind
from enclavefl.vfl.align import check_positions, check_sender, check_session
from enclavefl.vfl.align import hash_ids, lex_order, log_result, match_rows, new_session

__all__ = [
    "ORDER_KEY_BYTES",
    "TEE_JOIN",
    "TeeJoinFollower",
    "TeeJoinHello",
    "TeeJoinIds",
    "TeeJoinLeader",
    "TeeJoinResult",
]

TEE_JOIN = "tee-join"
ORDER_KEY_BYTES = 32
_DIGEST = 16


def _keyed(digests: np.ndarray, key: bytes) -> np.ndarray:
    # AES as a keyed permutation of each 16-byte hash: one OpenSSL call for every id
    # instead of one keyed hash per id, and a permutation cannot add collisions.
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    out = encryptor.update(digests.tobytes()) + encryptor.finalize()
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, _DIGEST)


class TeeJoinHello(AlignMessage, what="tee-join hello"):
    """Leader -> follower: the session, the order key and the leader's id kind."""

    session: bytes = wire(SESSION)
    order_key: bytes = wire(FixedBytes(ORDER_KEY_BYTES))
    id_kind: IdKind = wire(ID_KIND)


class TeeJoinIds(AlignMessage, what="tee-join ids"):
    """Follower -> leader: the follower's keyed id hashes, uint8 [m, 16], sorted."""

    session: bytes = wire(SESSION)
    hashed: np.ndarray = wire(ByteRows(_DIGEST))


class TeeJoinResult(AlignMessage, what="tee-join result"):
    """Leader -> follower: positions in the follower's sent list, in the common order."""

    session: bytes = wire(SESSION)
    positions: np.ndarray = wire(POSITIONS)


class TeeJoinLeader:
    """The leader's side (runs in its enclave): joins every follower's ids with its own.

    `order_key` fixes the common order (for a reproducible re-run); by default it is fresh
    and random for each alignment.
    """

    def __init__(self, ids: Ids, followers: Sequence[str], *, order_key: bytes | None = None) -> None:
        if order_key is not None and len(order_key) != ORDER_KEY_BYTES:
            raise UsageError(
                f"tee-join leader: order_key must be {ORDER_KEY_BYTES} bytes, got {len(order_key)}"
            )
        self._followers = check_followers(followers, TEE_JOIN)
        self._kind, digests = hash_ids(ids, digest_size=_DIGEST)
        self._key = order_key if order_key is not None else secrets.token_bytes(ORDER_KEY_BYTES)
        self._keyed = _keyed(digests, self._key)
        self._session = new_session()
        self._received: dict[str, np.ndarray] = {}

    def hello(self) -> TeeJoinHello:
        return TeeJoinHello(self._session, self._key, self._kind)

    def receive(self, follower: str, message: TeeJoinIds) -> None:
        what = f"tee-join ids from {follower!r}"
        check_sender(follower, self._followers, self._received, what, answer="ids")
        check_session(message.session, self._session, what)
        self._received[follower] = message.hashed

    def finish(self) -> tuple[AlignmentResult, dict[str, TeeJoinResult]]:
        """The leader's own alignment and the result message for each follower."""
        check_all_answered(self._followers, self._received, TEE_JOIN, answer="ids")
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
        check_id_kind(hello.id_kind, self._kind, TEE_JOIN)
        keyed = _keyed(self._digests, hello.order_key)
        self._sent_order = lex_order(keyed)
        self._session = hello.session
        return TeeJoinIds(hello.session, keyed[self._sent_order])

    def finish(self, result: TeeJoinResult) -> AlignmentResult:
        what = "tee-join result"
        check_answered_session(result.session, self._session, what)
        check_positions(result.positions, self._sent_order.size, what)
        aligned = AlignmentResult(self._sent_order[result.positions])
        log_result(TEE_JOIN, "follower", aligned.size)
        return aligned
