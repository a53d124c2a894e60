"""Sample alignment over the attested channel: tee-join or ecdh-psi between leader and followers.

The protocols themselves (enclavefl.vfl.teejoin, enclavefl.vfl.psi) are transport-free;
this module carries their messages. The leader is the server, so followers pull:

  vfl.align.hello   the follower names the alignment it holds sealed (if any);
                    answer: "reuse" (every party holds the same one) or the hello
  vfl.align.answer  the follower's protocol answer
  vfl.align.result  waits for the leader's result for this follower

An alignment is reused only when every party holds the same one (same protocol session),
so a restart does not redo it; otherwise all parties align again. Only the intersection
size is logged. Every party puts the intersection in its canonical order
(`enclavefl.vfl.align.canonical_order`: by a hash of the id) before using or sealing it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from enclavefl.errors import Check, FormatError, Rejected, UsageError
from enclavefl.net.admission import Peer
from enclavefl.net.client import AttestedClient
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import Message
from enclavefl.vfl.align import Ids, canonical_order
from enclavefl.vfl.bridge import DEFAULT_POLL_S, FollowerBridge
from enclavefl.vfl.errors import FollowerUnavailable
from enclavefl.vfl.psi import ECDH_PSI, EcdhPsiFollower, EcdhPsiLeader, PsiFollowerReply, PsiHello, PsiLeaderReply
from enclavefl.vfl.storage import Aligned, Storage
from enclavefl.vfl.teejoin import TEE_JOIN, TeeJoinFollower, TeeJoinHello, TeeJoinIds, TeeJoinLeader, TeeJoinResult

log = logging.getLogger("enclavefl.vfl")

HELLO, ANSWER, RESULT = "vfl.align.hello", "vfl.align.answer", "vfl.align.result"
METHODS = (TEE_JOIN, ECDH_PSI)
# method -> (hello, follower answer, leader result) message classes
_MESSAGES: dict[str, tuple[Any, Any, Any]] = {
    TEE_JOIN: (TeeJoinHello, TeeJoinIds, TeeJoinResult),
    ECDH_PSI: (PsiHello, PsiFollowerReply, PsiLeaderReply),
}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UsageError(f"unknown alignment method {method!r}: use one of {list(METHODS)}")
    return method


def _digest(arrays: dict[str, Any]) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode() + array.tobytes())
    return digest.digest()


class AlignmentEndpoint:
    """The leader's side: register it on the server, then `run` it once.

    `order_key` (tee-join only, 32 bytes) fixes the order the TEE returns (by default each
    alignment draws a fresh random one); the parties then order the intersection canonically
    anyway, so training does not depend on it.
    """

    def __init__(
        self,
        followers: Sequence[str],
        method: str,
        *,
        workers: int | None = None,
        order_key: bytes | None = None,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        if not followers or len(set(followers)) != len(followers):
            raise UsageError(f"followers must be distinct party names, at least one; got {list(followers)}")
        self.followers = tuple(followers)
        self.method = check_method(method)
        if order_key is not None and method != TEE_JOIN:
            raise UsageError(f"an alignment order key applies to tee-join only, not {method}")
        self._order_key = order_key
        self._workers = workers
        self._poll_s = poll_s
        self._cond = threading.Condition()
        self._reports: dict[str, str | None] = {}
        self._phase = "collecting"  # then "reuse" or "fresh"
        self._machine: Any = None
        self._hello: dict[str, np.ndarray] = {}
        self._answers: dict[str, bytes] = {}
        self._results: dict[str, Message] | None = None
        self._fetched: set[str] = set()
        self._current: Aligned | None = None

    def register(self, server: AttestedServer) -> None:
        server.register(HELLO, self._on_hello)
        server.register(ANSWER, self._on_answer)
        server.register(RESULT, self._on_result)

    def run(self, ids: Ids, *, stored: Aligned | None = None, timeout_s: float = 60.0) -> Aligned:
        """Align with every follower (or reuse `stored` if they all hold it); bounded waits."""
        with self._cond:
            self._wait(lambda: len(self._reports) == len(self.followers), timeout_s, "start the alignment",
                       lambda: [f for f in self.followers if f not in self._reports])  # fmt: skip
            if stored is not None and stored.method == self.method and all(
                self._reports[f] == stored.alignment_id for f in self.followers
            ):
                self._phase, self._current = "reuse", stored
                self._cond.notify_all()
                log.info("%s: every party holds the sealed alignment of %d samples: reusing it",
                         self.method, stored.size)  # fmt: skip
                return stored
        if self.method == TEE_JOIN:
            machine: Any = TeeJoinLeader(ids, self.followers, order_key=self._order_key)
        else:
            machine = EcdhPsiLeader(ids, self.followers, workers=self._workers)
        hello = machine.hello()
        with self._cond:
            self._machine, self._hello, self._phase = machine, hello.to_arrays(), "fresh"
            self._cond.notify_all()
            self._wait(lambda: len(self._answers) == len(self.followers), timeout_s, "answer the alignment",
                       lambda: [f for f in self.followers if f not in self._answers])  # fmt: skip
        own, results = machine.finish()
        aligned = Aligned(self.method, hello.session.hex(), canonical_order(own, ids))
        with self._cond:
            self._current = aligned
            self._results = {
                name: Message(meta={"status": "result", "alignment": aligned.alignment_id}, tensors=r.to_arrays())
                for name, r in results.items()
            }
            self._cond.notify_all()
            self._wait(lambda: len(self._fetched) == len(self.followers), timeout_s, "fetch the alignment result",
                       lambda: [f for f in self.followers if f not in self._fetched])  # fmt: skip
        return aligned

    def _wait(self, ready: Any, timeout_s: float, what: str, missing: Any) -> None:
        if not self._cond.wait_for(ready, timeout_s):
            parties = missing()
            raise FollowerUnavailable(
                f"follower(s) {parties} did not {what} within {timeout_s:g} s; vertical FL cannot continue "
                "without their columns",
                parties=parties,
            )

    def _party(self, peer: Peer) -> str:
        if peer.party not in self.followers:
            raise Rejected(
                f"party {peer.party!r} is not a follower of this job {list(self.followers)}", check=Check.VFL_PARTY
            )
        return peer.party

    def _on_hello(self, peer: Peer, request: Message) -> Message:
        party = self._party(peer)
        method = request.meta.get("method")
        if method != self.method:
            raise Rejected(
                f"alignment method mismatch: follower {party} uses {method!r}, the leader {self.method!r}",
                check=Check.VFL_ALIGNMENT,
            )
        stored = request.meta.get("stored")
        if stored is not None and not isinstance(stored, str):
            raise FormatError(f"alignment hello from {party}: 'stored' must be a string or null, got {stored!r}")
        with self._cond:
            self._reports[party] = stored
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._phase != "collecting", self._poll_s)
            current = self._current
            if current is not None and stored == current.alignment_id:
                return Message(meta={"status": "reuse", "alignment": current.alignment_id})
            if self._phase == "collecting":
                return Message(meta={"status": "wait"})
            if self._phase == "fresh" and party not in self._answers:
                return Message(meta={"status": "hello", "method": self.method}, tensors=self._hello)
            held = "none" if stored is None else f"{stored[:12]}…"
            job = "in progress" if current is None else f"{current.alignment_id[:12]}…"
            raise Rejected(
                f"follower {party} holds alignment {held}, the job's is {job}: a follower that restarts "
                "during a job must keep its sealed alignment (storage with resume)",
                check=Check.VFL_ALIGNMENT,
            )

    def _on_answer(self, peer: Peer, request: Message) -> Message:
        party = self._party(peer)
        _, answer_cls, _ = _MESSAGES[self.method]
        arrays = {name: np.asarray(value) for name, value in request.tensors.items()}
        digest = _digest(arrays)
        with self._cond:
            if self._phase != "fresh":
                raise Rejected(f"alignment answer from {party}: no alignment is in progress", check=Check.VFL_PROTOCOL)
            known = self._answers.get(party)
            if known is not None:
                if known != digest:
                    raise Rejected(
                        f"alignment answer from {party}: a second, different answer", check=Check.VFL_PROTOCOL
                    )
                return Message(meta={"status": "duplicate"})
            self._machine.receive(party, answer_cls.from_arrays(arrays))
            self._answers[party] = digest
            self._cond.notify_all()
        return Message(meta={"status": "ok"})

    def _on_result(self, peer: Peer, request: Message) -> Message:
        party = self._party(peer)
        with self._cond:
            if party not in self._answers:
                raise Rejected(f"alignment result for {party}: it has not answered", check=Check.VFL_PROTOCOL)
            self._cond.wait_for(lambda: self._results is not None, self._poll_s)
            if self._results is None:
                return Message(meta={"status": "wait"})
            self._fetched.add(party)
            self._cond.notify_all()
            return self._results[party]


def follow_alignment(
    bridge: FollowerBridge, method: str, ids: Ids, *, stored: Aligned | None = None, workers: int | None = None
) -> Aligned:
    """The follower's side over `bridge`: reuse `stored` if the leader agrees, else align."""
    method = check_method(method)
    if stored is not None and stored.method != method:
        stored = None
    hello_cls, _, result_cls = _MESSAGES[method]
    offer = {"method": method, "stored": stored.alignment_id if stored else None}
    while True:
        answer = bridge.call_raw(HELLO, Message(meta=offer))
        status = answer.meta.get("status")
        if status == "reuse":
            if stored is None or answer.meta.get("alignment") != stored.alignment_id:
                raise FormatError(f"leader answered 'reuse' for an alignment this party does not hold: {answer.meta}")
            log.info("%s: reusing the sealed alignment of %d samples", method, stored.size)
            return stored
        if status == "hello":
            break
        if status != "wait":
            raise FormatError(f"alignment hello: unexpected answer {answer.meta}")
    hello = hello_cls.from_arrays(answer.tensors)
    machine: Any = TeeJoinFollower(ids) if method == TEE_JOIN else EcdhPsiFollower(ids, workers=workers)
    bridge.call_raw(ANSWER, Message(tensors=machine.answer(hello).to_arrays()))
    while True:
        answer = bridge.call_raw(RESULT, Message())
        if answer.meta.get("status") == "result":
            break
        if answer.meta.get("status") != "wait":
            raise FormatError(f"alignment result: unexpected answer {answer.meta}")
    result = machine.finish(result_cls.from_arrays(answer.tensors))
    return Aligned(method, hello.session.hex(), canonical_order(result, ids))


def _stored(storage: Storage | None, ids: Ids, resume: bool) -> Aligned | None:
    return storage.load_alignment(ids) if storage is not None and resume else None


def align_as_leader(
    server: AttestedServer,
    method: str,
    ids: Ids,
    followers: Sequence[str],
    *,
    storage: Storage | None = None,
    resume: bool = False,
    timeout_s: float = 60.0,
    workers: int | None = None,
    order_key: bytes | None = None,
) -> Aligned:
    """Register the alignment on `server` (started or not) and run it; sealed in `storage` if given."""
    endpoint = AlignmentEndpoint(followers, method, workers=workers, order_key=order_key)
    endpoint.register(server)
    stored = _stored(storage, ids, resume)
    aligned = endpoint.run(ids, stored=stored, timeout_s=timeout_s)
    if storage is not None and aligned is not stored:
        storage.clear_checkpoints()  # they were made in the old alignment's order
        storage.save_alignment(aligned, ids)
    return aligned


def align_as_follower(
    client: AttestedClient,
    method: str,
    ids: Ids,
    *,
    storage: Storage | None = None,
    resume: bool = False,
    workers: int | None = None,
    reconnect_timeout_s: float = 120.0,
) -> Aligned:
    """Align with the leader behind `client`; sealed in `storage` if given."""
    stored = _stored(storage, ids, resume)
    aligned = follow_alignment(
        FollowerBridge(client, reconnect_timeout_s=reconnect_timeout_s), method, ids, stored=stored, workers=workers
    )
    if storage is not None and aligned is not stored:
        storage.clear_checkpoints()  # they were made in the old alignment's order
        storage.save_alignment(aligned, ids)
    return aligned
