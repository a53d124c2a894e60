"""ecdh-psi: X25519 Diffie-Hellman private set intersection, safe without trusting any TEE.

Each id is hashed to an X25519 u-coordinate H(id) (BLAKE2b-256, domain-separated, top bit
cleared) and "exponentiated" by X25519 scalar multiplication with a party's fresh secret.
Clamped X25519 scalars commute, so [b][a]H(x) == [a][b]H(x): equal ids give equal
double-blinded values and nothing else is comparable (decisional Diffie-Hellman).

Messages (leader L with secret a, follower F with secret b):
  L -> F  PsiHello          session, id kind, X = [a]H(l) for L's ids, sorted
  F -> L  PsiFollowerReply  Y = [b]H(f) for F's ids, sorted; Z = [b]X, in X's order
  L -> F  PsiLeaderReply    W = [a]Y, in Y's order; positions, in Y, of the intersection
                            in the common order

Both parties learn the intersection (L by matching Z with W, F the same way), the other
party's set size, and nothing about the other party's other ids: the only values that
cross are singly blinded (unlinkable to ids without that party's secret) or double-blinded.
Common order: ascending double-blinded value [ab]H(id) (with several followers, that of
the first follower), pseudorandom, so it reveals no party's row order. A follower refuses
a result that names a row outside the intersection it computed itself. Security model:
semi-honest parties, as for the ECDH-PSI of SecretFlow and FATE.

Scalar multiplication dominates (two per id per party), so it runs in a pool of `workers`
processes; the secret reaches them as a task argument over a local pipe and is never logged.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from enclavefl.errors import Check, Rejected, UsageError
from enclavefl.vfl.align import ID_KIND, POSITIONS, SESSION, AlignmentResult, AlignMessage, ByteRows, IdKind, Ids, wire
from enclavefl.vfl.align import check_all_answered, check_answered_session, check_followers, check_id_kind
from enclavefl.vfl.align import check_positions, check_sender, check_session
from enclavefl.vfl.align import hash_ids, lex_order, log_result, match_rows, new_session

__all__ = [
    "ECDH_PSI",
    "HASH_PERSON",
    "POINTS",
    "POINT_BYTES",
    "EcdhPsiFollower",
    "EcdhPsiLeader",
    "PsiFollowerReply",
    "PsiHello",
    "PsiLeaderReply",
    "hash_to_points",
    "scalarmult_rows",
]

ECDH_PSI = "ecdh-psi"
POINT_BYTES = 32
HASH_PERSON = b"enclavefl-psi/1"  # BLAKE2b personalisation: domain separation of H
_CHUNK_ROWS = 16384
POINTS = ByteRows(POINT_BYTES)


def hash_to_points(ids: Ids) -> tuple[IdKind, np.ndarray]:
    """H(id) for each id: uint8 [n, 32] X25519 u-coordinates (duplicates refused)."""
    kind, digests = hash_ids(ids, digest_size=POINT_BYTES, person=HASH_PERSON)
    points = digests.copy()
    points[:, 31] &= 0x7F  # RFC 7748 ignores the top bit; clear it so H(id) is what is used
    return kind, points


def _scalarmult_chunk(secret: bytes, blob: bytes, first_row: int) -> bytes:
    key = X25519PrivateKey.from_private_bytes(secret)
    exchange, load = key.exchange, X25519PublicKey.from_public_bytes
    out = []
    for offset in range(0, len(blob), POINT_BYTES):
        try:
            out.append(exchange(load(blob[offset : offset + POINT_BYTES])))
        except ValueError:
            # cryptography refuses an all-zero result: the input was a low-order point.
            row = first_row + offset // POINT_BYTES
            raise Rejected(
                f"x25519: row {row} is a low-order point, not a blinded id", check=Check.PSI_POINT
            ) from None
    return b"".join(out)


def scalarmult_rows(secret: bytes, points: np.ndarray, workers: int) -> np.ndarray:
    """X25519(secret, u) for each row of uint8 [n, 32], spread over `workers` processes."""
    n = points.shape[0]
    blob = points.tobytes()
    if workers <= 1 or n <= _CHUNK_ROWS:
        out = _scalarmult_chunk(secret, blob, 0)
    else:
        starts = range(0, n, _CHUNK_ROWS)
        chunks = (blob[s * POINT_BYTES : (s + _CHUNK_ROWS) * POINT_BYTES] for s in starts)
        # spawn, not fork: the parties also run gRPC threads, which fork would corrupt.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            out = b"".join(pool.map(_scalarmult_chunk, repeat(secret), chunks, starts))
    return np.frombuffer(out, dtype=np.uint8).reshape(n, POINT_BYTES)


def _worker_count(workers: int | None) -> int:
    if workers is None:  # the cores this process may run on, not the host's
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers < 1:
        raise UsageError(f"ecdh-psi: workers must be at least 1, got {workers}")
    return workers


class PsiHello(AlignMessage, what="ecdh-psi hello"):
    """Leader -> follower: the session, the leader's id kind, its blinded ids (sorted)."""

    session: bytes = wire(SESSION)
    id_kind: IdKind = wire(ID_KIND)
    blinded: np.ndarray = wire(POINTS)


class PsiFollowerReply(AlignMessage, what="ecdh-psi follower reply"):
    """Follower -> leader: its own blinded ids (sorted), and the leader's re-blinded."""

    session: bytes = wire(SESSION)
    blinded: np.ndarray = wire(POINTS)
    reblinded: np.ndarray = wire(POINTS)


class PsiLeaderReply(AlignMessage, what="ecdh-psi leader reply"):
    """Leader -> follower: the follower's ids re-blinded, and the aligned positions."""

    session: bytes = wire(SESSION)
    reblinded: np.ndarray = wire(POINTS)
    positions: np.ndarray = wire(POSITIONS)


class EcdhPsiLeader:
    """The leader's side: blinds its ids, re-blinds each follower's, decides the order."""

    def __init__(self, ids: Ids, followers: Sequence[str], *, workers: int | None = None) -> None:
        self._followers = check_followers(followers, ECDH_PSI)
        self._workers = _worker_count(workers)
        self._kind, self._points = hash_to_points(ids)
        self._secret = secrets.token_bytes(32)
        self._session = new_session()
        self._hello: PsiHello | None = None
        self._sent_order = np.empty(0, dtype=np.int64)
        # follower -> (Z = [b][a]H(l) in the hello's order, W = [a][b]H(f) in the reply's order)
        self._received: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def hello(self) -> PsiHello:
        """The same hello for every follower (blinding runs once)."""
        if self._hello is None:
            blinded = scalarmult_rows(self._secret, self._points, self._workers)
            self._sent_order = lex_order(blinded)
            self._hello = PsiHello(self._session, self._kind, blinded[self._sent_order])
        return self._hello

    def receive(self, follower: str, reply: PsiFollowerReply) -> None:
        what = f"ecdh-psi reply from {follower!r}"
        check_sender(follower, self._followers, self._received, what, answer="reply")
        if self._hello is None:
            raise UsageError(f"{what}: received before the hello was made")
        check_session(reply.session, self._session, what)
        if reply.reblinded.shape[0] != self._sent_order.size:
            raise Rejected(
                f"{what}: {reply.reblinded.shape[0]} re-blinded rows, the hello had {self._sent_order.size}",
                check=Check.ALIGN_PROTOCOL,
            )
        theirs = scalarmult_rows(self._secret, reply.blinded, self._workers)
        self._received[follower] = (reply.reblinded, theirs)

    def finish(self) -> tuple[AlignmentResult, dict[str, PsiLeaderReply]]:
        """The leader's own alignment and the reply for each follower."""
        check_all_answered(self._followers, self._received, ECDH_PSI, answer="reply")
        n = self._sent_order.size
        in_all = np.ones(n, dtype=bool)
        positions: dict[str, np.ndarray] = {}
        values: dict[str, np.ndarray] = {}
        rows: dict[str, np.ndarray] = {}
        for name in self._followers:
            mine_z, theirs = self._received[name]
            sent, their_positions = match_rows(mine_z, theirs, what=f"ecdh-psi reply from {name!r}")
            rows[name], values[name] = self._sent_order[sent], mine_z[sent]
            position = np.full(n, -1, dtype=np.int64)
            position[rows[name]] = their_positions
            in_all &= position >= 0
            positions[name] = position
        first = self._followers[0]
        keep = in_all[rows[first]]
        common = rows[first][keep][lex_order(values[first][keep])]
        log_result(ECDH_PSI, "leader", common.size)
        replies = {
            name: PsiLeaderReply(self._session, self._received[name][1], positions[name][common])
            for name in self._followers
        }
        return AlignmentResult(common), replies


class EcdhPsiFollower:
    """A follower's side: blinds its ids and the leader's, then checks the leader's answer."""

    def __init__(self, ids: Ids, *, workers: int | None = None) -> None:
        self._workers = _worker_count(workers)
        self._kind, self._points = hash_to_points(ids)
        self._session: bytes | None = None
        self._sent_order = np.empty(0, dtype=np.int64)
        self._reblinded = np.empty((0, POINT_BYTES), dtype=np.uint8)

    def answer(self, hello: PsiHello) -> PsiFollowerReply:
        check_id_kind(hello.id_kind, self._kind, ECDH_PSI)
        secret = secrets.token_bytes(32)  # fresh per session: answers to two hellos are unlinkable
        m = self._points.shape[0]
        both = scalarmult_rows(secret, np.concatenate([self._points, hello.blinded]), self._workers)
        own, self._reblinded = both[:m], both[m:]
        self._sent_order = lex_order(own)
        self._session = hello.session
        return PsiFollowerReply(hello.session, own[self._sent_order], self._reblinded)

    def finish(self, reply: PsiLeaderReply) -> AlignmentResult:
        what = "ecdh-psi leader reply"
        check_answered_session(reply.session, self._session, what)
        m = self._sent_order.size
        if reply.reblinded.shape[0] != m:
            raise Rejected(
                f"{what}: {reply.reblinded.shape[0]} re-blinded rows, this follower sent {m}",
                check=Check.ALIGN_PROTOCOL,
            )
        check_positions(reply.positions, m, what)
        _, mine = match_rows(self._reblinded, reply.reblinded, what=what)
        in_intersection = np.zeros(m, dtype=bool)
        in_intersection[mine] = True
        if not in_intersection[reply.positions].all():
            raise Rejected(f"{what}: a position names an id outside the intersection", check=Check.PSI_RESULT)
        aligned = AlignmentResult(self._sent_order[reply.positions])
        log_result(ECDH_PSI, "follower", aligned.size)
        return aligned
