"""The iteration bridge between the leader (the attested server) and its followers (clients).

Per iteration i the leader opens start(i); each follower sends named data messages for i
(its activations); the leader answers with named messages (the gradient of that
follower's activations); every party steps; then commit(i). Followers are the clients,
so they drive the calls, and the leader's handlers long-poll:

  vfl.join   what state the follower can restore -> session, plan and resume point
  vfl.start  "is i open?", carrying the follower's commit -> open, wait, done or rejoin
  vfl.send   a data message for (i, name); may wait for the leader's reply message
  vfl.recv   waits for the leader's message for (i, name)
  vfl.leave  after "done": the leader may stop once every follower left
  vfl.refuse a follower refuses this leader (the check and the reason): the leader stops

Every call may be repeated after a lost connection: data messages are kept or dropped as
duplicates by (iteration, name, party), replies stay available until the follower
commits, commits only move forward. At most `pipeline_depth` iterations are in flight
(`Plan.required`). A session is the leader's instance id plus a generation, bumped when
the federation rewinds to a common checkpoint (a party restarted); a call made under a
stale session is answered "rejoin".

Peer-based rollback protection: the leader tells followers the newest checkpoint it has
sealed (in every join and start answer), and keeps the newest checkpoint each follower
committed (a follower seals before it commits). A restarted leader whose newest
checkpoint is older than a follower was told is refused by that follower, which says so
(vfl.refuse) so that the leader stops at once instead of waiting for it; a follower that
rejoins unable to restore a checkpoint it had committed is refused by the leader.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from enclavefl.errors import Check, EnclaveflError, FormatError, Rejected, TransportError, UsageError
from enclavefl.net.admission import Peer
from enclavefl.net.client import AttestedClient
from enclavefl.net.errors import CallFailed, ConnectFailed, HandshakeFailed
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import Message
from enclavefl.validate import is_int
from enclavefl.vfl.errors import FollowerRefused, FollowerUnavailable, LeaderUnreachable, ResumeFailed
from enclavefl.vfl.plan import Plan

__all__ = [
    "DEFAULT_POLL_S",
    "JOIN",
    "LEAVE",
    "RECV",
    "REFUSE",
    "SEND",
    "START",
    "FollowerBridge",
    "JoinReport",
    "LeaderBridge",
    "Rewind",
    "SessionLost",
    "meta_int",
    "meta_str",
]

log = logging.getLogger("enclavefl.vfl")

JOIN, START, SEND, RECV, LEAVE = "vfl.join", "vfl.start", "vfl.send", "vfl.recv", "vfl.leave"
REFUSE = "vfl.refuse"
_MAX_REASON = 2048  # characters of a follower's refusal kept in the leader's error
DEFAULT_POLL_S = 2.0
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Connection problems a follower waits out (the leader restarting, a dropped link).
_RETRYABLE_CODES = frozenset({"UNAVAILABLE", "UNAUTHENTICATED", "DEADLINE_EXCEEDED", "CANCELLED"})


class Rewind(Exception):
    """Control flow inside the leader: every party must restore `iteration` and go on from there."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"rewind to iteration {iteration}")
        self.iteration = iteration


@dataclass(frozen=True)
class JoinReport:
    """What a joining follower can restore: iterations (-1: its initial state)."""

    alignment_id: str
    restorable: frozenset[int]


def meta_int(meta: Mapping[str, Any], name: str, what: str, *, minimum: int = -1) -> int:
    value = meta.get(name)
    if not is_int(value) or value < minimum:
        raise FormatError(f"{what}: field {name!r} must be an integer >= {minimum}, got {value!r}")
    return value


def meta_str(meta: Mapping[str, Any], name: str, what: str) -> str:
    value = meta.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise FormatError(f"{what}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _data_name(meta: Mapping[str, Any], field: str, what: str) -> str:
    value = meta_str(meta, field, what)
    if not _NAME.fullmatch(value):
        raise FormatError(f"{what}: message name {value!r} must match {_NAME.pattern}")
    return value


@dataclass(frozen=True)
class _Call:
    """A follower's call inside its session: who, how errors name the call, which iteration."""

    party: str
    what: str
    iteration: int


_Handler = Callable[["LeaderBridge", _Call, Message], Message]


def _in_session(action: str) -> Callable[[_Handler], Callable[[LeaderBridge, Peer, Message], Message]]:
    """A handler of a follower's per-iteration call (`action` names it in errors).

    The wrapper checks the party and the iteration field, then runs the handler under the
    bridge's lock; a call made under a stale session is answered "rejoin" before its other
    fields are read.
    """

    def wrap(handler: _Handler) -> Callable[[LeaderBridge, Peer, Message], Message]:
        @functools.wraps(handler)
        def handle(self: LeaderBridge, peer: Peer, request: Message) -> Message:
            party = self._party(peer)
            what = f"{action} {party}"
            iteration = meta_int(request.meta, "iteration", what, minimum=0)
            with self._cond:
                if self._stale(party, request.meta):
                    return self._rejoin()
                return handler(self, _Call(party, what, iteration), request)

        return handle

    return wrap


class LeaderBridge:
    """The leader's end: serves the followers' calls; the leader's loop drives it.

    `restorable()` gives the iterations the leader can restore from storage (checkpoints,
    and -1 for its initial state); the bridge adds the iteration the leader is at.
    `validate(party, iteration, name, message)` checks a follower's data message before it
    is accepted (raise FormatError: the follower gets it, the job goes on).
    Waits for followers give up after `timeout_s` with FollowerUnavailable, or at once with
    FollowerRefused when a follower refused this leader.
    """

    def __init__(
        self,
        followers: Sequence[str],
        *,
        restorable: Callable[[], Iterable[int]],
        validate: Callable[[str, int, str, Message], None] | None = None,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        if not followers or len(set(followers)) != len(followers):
            raise UsageError(f"followers must be distinct party names, at least one; got {list(followers)}")
        self.followers = tuple(followers)
        self.instance = secrets.token_hex(8)
        self._restorable = restorable
        self._validate = validate
        self._poll_s = poll_s
        self._cond = threading.Condition()
        self._alignment_id: str | None = None
        self._plan: Plan | None = None
        self._generation = 0  # 0: not established yet
        self._opened = self._done = -1
        self._committed = dict.fromkeys(self.followers, -1)
        self._members: dict[str, int] = {}
        self._inbox: dict[tuple[int, str, str], Message] = {}
        self._collected: set[tuple[int, str]] = set()
        self._outbox: dict[tuple[int, str, str], Message] = {}
        self._reports: dict[str, JoinReport] = {}
        self._rewind: int | None = None
        self._closing = False
        self._finished: set[str] = set()
        self._sealed = -1  # the leader's newest sealed checkpoint, told to followers
        self._kept = -1  # keep_best: the iteration whose weights the leader keeps, told in "done"
        self._follower_sealed = dict.fromkeys(self.followers, -1)  # newest checkpoint each committed
        self._refusal: FollowerRefused | None = None  # the first follower that refused this leader

    def register(self, server: AttestedServer) -> None:
        server.register(JOIN, self._on_join)
        server.register(START, self._on_start)
        server.register(SEND, self._on_send)
        server.register(RECV, self._on_recv)
        server.register(LEAVE, self._on_leave)
        server.register(REFUSE, self._on_refuse)

    @property
    def session(self) -> str:
        return f"{self.instance}:{self._generation}"

    @property
    def plan(self) -> Plan | None:
        return self._plan

    # --- the leader's loop ------------------------------------------------------------------

    def set_alignment(self, alignment_id: str) -> None:
        with self._cond:
            self._alignment_id = alignment_id
            self._reports = {f: r for f, r in self._reports.items() if r.alignment_id == alignment_id}
            self._cond.notify_all()

    def wait_for_reports(self, timeout_s: float) -> dict[str, JoinReport]:
        """Every follower's join report (startup), or FollowerUnavailable after `timeout_s`."""
        with self._cond:
            self._wait(lambda: len(self._reports) == len(self.followers), timeout_s, "join training",
                       lambda: [f for f in self.followers if f not in self._reports], rewinds=False)  # fmt: skip
            return dict(self._reports)

    def establish(self, plan: Plan, resume: int) -> None:
        """Start a generation at `resume` (every party restored it); waiting joins are answered."""
        with self._cond:
            self._plan = plan
            self._generation += 1
            self._reset(resume)
            self._cond.notify_all()

    def set_sealed(self, iteration: int) -> None:
        """The leader's newest sealed checkpoint is now `iteration` (-1: none)."""
        with self._cond:
            self._sealed = iteration

    def set_kept(self, iteration: int) -> None:
        """keep_best: the leader keeps the weights of evaluation `iteration` (-1: none yet)."""
        with self._cond:
            self._kept = iteration

    def rewound(self, iteration: int) -> None:
        """The leader restored `iteration`; its loop goes on (unless a later rewind came meanwhile)."""
        with self._cond:
            if self._rewind == iteration:
                self._rewind = None

    def open(self, iteration: int, timeout_s: float) -> None:
        """Open `iteration` once every party committed what the plan requires before it."""
        plan = self._require_plan()
        need = plan.required(iteration)
        with self._cond:
            self._wait(lambda: self._global_committed() >= need, timeout_s, f"commit iteration {need}",
                       lambda: [f for f in self.followers if self._committed[f] < need])  # fmt: skip
            self._opened = iteration
            # Data for committed iterations is refused by the commit check: forget it here.
            floor = self._global_committed()
            self._collected = {key for key in self._collected if key[0] > floor}
            self._cond.notify_all()

    def collect(self, iteration: int, name: str, timeout_s: float) -> dict[str, Message]:
        """Every follower's message (iteration, name), in follower order."""
        with self._cond:
            self._wait(lambda: all((iteration, name, f) in self._inbox for f in self.followers), timeout_s,
                       f"send {name!r} of iteration {iteration}",
                       lambda: [f for f in self.followers if (iteration, name, f) not in self._inbox])  # fmt: skip
            self._collected.add((iteration, name))
            return {f: self._inbox.pop((iteration, name, f)) for f in self.followers}

    def post(self, iteration: int, name: str, messages: Mapping[str, Message]) -> None:
        """The leader's message (iteration, name) for each follower."""
        with self._cond:
            self._check_rewind()
            for follower, message in messages.items():
                self._outbox[(iteration, name, follower)] = message
            self._cond.notify_all()

    def finish(self, iteration: int) -> None:
        """The leader's own part of `iteration` is done (it stepped, or evaluated)."""
        with self._cond:
            self._check_rewind()
            self._done = iteration
            self._cond.notify_all()

    def wait_committed(self, iteration: int, timeout_s: float) -> None:
        with self._cond:
            self._wait(lambda: self._global_committed() >= iteration, timeout_s, f"commit iteration {iteration}",
                       lambda: [f for f in self.followers if self._committed[f] < iteration])  # fmt: skip

    def close(self, timeout_s: float) -> None:
        """After the last iteration: answer "done" and wait (bounded) until every follower left."""
        plan = self._require_plan()
        self.wait_committed(plan.total - 1, timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            deadline = time.monotonic() + timeout_s
            while len(self._finished) < len(self.followers):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [f for f in self.followers if f not in self._finished]
                    log.warning("followers %s did not leave within %g s of the job's end", missing, timeout_s)
                    return
                self._cond.wait(remaining)

    def _require_plan(self) -> Plan:
        if self._plan is None:
            raise UsageError("the bridge has no plan yet: establish() first")
        return self._plan

    def _global_committed(self) -> int:
        return min(self._done, *self._committed.values())

    def _check_rewind(self) -> None:
        if self._rewind is not None:
            raise Rewind(self._rewind)

    def _wait(
        self,
        ready: Callable[[], bool],
        timeout_s: float,
        what: str,
        missing: Callable[[], list[str]],
        *,
        rewinds: bool = True,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._refusal is not None:
                raise self._refusal
            if rewinds:
                self._check_rewind()
            if ready():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                parties = missing()
                raise FollowerUnavailable(
                    f"follower(s) {parties} did not {what} within {timeout_s:g} s; vertical FL cannot "
                    "continue without their columns",
                    parties=parties,
                )
            self._cond.wait(remaining)

    def _reset(self, resume: int) -> None:
        """Everything restarts from `resume` (caller holds the lock)."""
        self._opened = self._done = resume
        self._committed = dict.fromkeys(self.followers, resume)
        # Every party deletes its checkpoints after `resume`: they were legitimately dropped.
        self._follower_sealed = {p: min(v, resume) for p, v in self._follower_sealed.items()}
        self._members.clear()
        self._inbox.clear()
        self._outbox.clear()
        self._collected.clear()
        self._finished.clear()
        self._closing = False

    # --- handlers -----------------------------------------------------------------------------

    def _party(self, peer: Peer) -> str:
        if peer.party not in self.followers:
            raise Rejected(
                f"party {peer.party!r} is not a follower of this job {list(self.followers)}", check=Check.VFL_PARTY
            )
        return peer.party

    def _stale(self, party: str, meta: Mapping[str, Any]) -> bool:
        return (
            self._generation == 0
            or meta.get("session") != self.session
            or self._members.get(party) != self._generation
        )

    def _rejoin(self) -> Message:
        return Message(meta={"status": "rejoin", "instance": self.instance})

    def _on_join(self, peer: Peer, request: Message) -> Message:
        party = self._party(peer)
        what = f"join of {party}"
        alignment_id = meta_str(request.meta, "alignment", what)
        restorable = request.meta.get("restorable")
        if not isinstance(restorable, list) or not all(
            is_int(i) and i >= -1 for i in restorable
        ):
            raise FormatError(f"{what}: 'restorable' must be a list of iterations >= -1, got {restorable!r}")
        report = JoinReport(alignment_id, frozenset(restorable) | {-1})
        with self._cond:
            if self._alignment_id is not None and alignment_id != self._alignment_id:
                raise Rejected(
                    f"{what}: alignment {alignment_id[:12]}… is not this job's {self._alignment_id[:12]}…",
                    check=Check.VFL_ALIGNMENT,
                )
            self._reports[party] = report
            self._cond.notify_all()
            if self._generation == 0:
                self._cond.wait_for(lambda: self._generation > 0, self._poll_s)
                if self._generation == 0:
                    return Message(meta={"status": "wait"})
            return self._admit(party, report)

    def _admit(self, party: str, report: JoinReport) -> Message:
        plan = self._require_plan()
        newest, sealed = max(report.restorable), self._follower_sealed[party]
        if newest < sealed:
            raise Rejected(
                f"follower {party} came back able to restore iteration {newest} at most, but it had sealed and "
                f"committed the checkpoint of iteration {sealed} before (this leader saw it): its newer "
                "checkpoints were deleted or rolled back; refusing it (peer-based rollback protection)",
                check="freshness",
            )
        leader = {i for i in self._restorable() if i <= self._done} | {self._done, -1}
        if self._done in report.restorable:
            resume = self._done
        else:
            common = leader & report.restorable
            if not common:
                raise ResumeFailed(
                    f"follower {party} can restore iterations {sorted(report.restorable)}, the leader "
                    f"{sorted(leader)}: no common point to resume from"
                )
            resume = max(common)
            log.warning(
                "follower %s rejoined able to restore iteration %d: every party goes back from %d to %d",
                party, resume, self._done, resume,
            )
            self._rewind = resume
            self._generation += 1
            self._reset(resume)
        self._members[party] = self._generation
        self._committed[party] = resume
        for key in [k for k in self._outbox if k[2] == party]:
            del self._outbox[key]
        self._cond.notify_all()
        log.info("follower %s joined at iteration %d (session generation %d)", party, resume, self._generation)
        return Message(meta={
            "status": "ready", "session": self.session, "resume": resume, "plan": plan.to_meta(),
            "sealed": self._sealed,
        })  # fmt: skip

    @_in_session("start from")
    def _on_start(self, call: _Call, request: Message) -> Message:
        party, what, iteration = call.party, call.what, call.iteration
        committed = meta_int(request.meta, "committed", what)
        plan = self._require_plan()
        if committed > self._opened:
            raise Rejected(f"{what}: commits iteration {committed}, which was never opened", check=Check.VFL_PROTOCOL)
        if committed > self._committed[party]:
            self._committed[party] = committed
            if plan.is_checkpoint(committed):
                self._follower_sealed[party] = max(self._follower_sealed[party], committed)
            for key in [k for k in self._outbox if k[2] == party and k[0] <= committed]:
                del self._outbox[key]
            self._cond.notify_all()
        deadline = time.monotonic() + self._poll_s
        while True:
            if self._stale(party, request.meta):
                return self._rejoin()
            if iteration <= self._opened:
                return Message(meta={"status": "open", "iteration": iteration, "sealed": self._sealed})
            if iteration > self._opened + 1:
                raise Rejected(
                    f"{what}: asks for iteration {iteration}, but only {self._opened} is open",
                    check=Check.VFL_PROTOCOL,
                )
            need = plan.total - 1 if iteration == plan.total else plan.required(iteration)
            if iteration == plan.total and self._closing:
                return Message(meta={"status": "done", "best": self._kept})
            remaining = deadline - time.monotonic()
            # Waiting on this follower's own commits: tell it at once.
            if self._committed[party] < need or remaining <= 0:
                return Message(meta={"status": "wait", "commit_through": need})
            self._cond.wait(remaining)

    @_in_session("data from")
    def _on_send(self, call: _Call, request: Message) -> Message:
        party, what, iteration = call.party, call.what, call.iteration
        name = _data_name(request.meta, "name", what)
        reply = None if request.meta.get("reply") is None else _data_name(request.meta, "reply", what)
        if iteration > self._opened:
            raise Rejected(f"{what}: iteration {iteration} is not open", check=Check.VFL_PROTOCOL)
        key = (iteration, name, party)
        duplicate = (iteration, name) in self._collected or key in self._inbox or iteration <= self._committed[party]
        if duplicate:
            log.debug("dropped a duplicate %r for iteration %d from %s", name, iteration, party)
        else:
            if self._validate is not None:
                self._validate(party, iteration, name, request)
            self._inbox[key] = request
            self._cond.notify_all()
        status = "duplicate" if duplicate else "ok"
        if reply is None:
            return Message(meta={"status": status})
        answer = self._await_reply(party, request.meta, (iteration, reply, party))
        return answer or Message(meta={"status": status})

    @_in_session("receive by")
    def _on_recv(self, call: _Call, request: Message) -> Message:
        party, what, iteration = call.party, call.what, call.iteration
        name = _data_name(request.meta, "name", what)
        if iteration <= self._committed[party] or iteration > self._opened:
            raise Rejected(
                f"{what}: iteration {iteration} is committed or not open (open through {self._opened})",
                check=Check.VFL_PROTOCOL,
            )
        return self._await_reply(party, request.meta, (iteration, name, party)) or Message(meta={"status": "wait"})

    def _on_leave(self, peer: Peer, request: Message) -> Message:
        party = self._party(peer)
        with self._cond:
            if self._stale(party, request.meta) or not self._closing:
                raise Rejected(f"{party} leaves, but the job has not ended for it", check=Check.VFL_PROTOCOL)
            self._finished.add(party)
            self._cond.notify_all()
        return Message(meta={"status": "bye"})

    def _on_refuse(self, peer: Peer, request: Message) -> Message:
        party = self._party(peer)
        what = f"refusal from {party}"
        check = Check.from_wire(meta_str(request.meta, "check", what))
        reason = request.meta.get("reason")
        if not isinstance(reason, str) or not reason:
            raise FormatError(f"{what}: field 'reason' must be a non-empty string, got {reason!r}")
        if len(reason) > _MAX_REASON:
            reason = reason[:_MAX_REASON] + "…"
        log.warning("follower %s refused this leader (%s): %s", party, check.value, reason)
        with self._cond:
            if self._refusal is None:
                self._refusal = FollowerRefused(
                    f"follower {party} refused this leader ({check.value}): {reason}", party=party, check=check
                )
            self._cond.notify_all()
        return Message(meta={"status": "noted"})

    def _await_reply(self, party: str, meta: Mapping[str, Any], key: tuple[int, str, str]) -> Message | None:
        """The leader's message under `key` once posted (within one poll), rejoin, or None."""
        deadline = time.monotonic() + self._poll_s
        while True:
            if self._stale(party, meta):
                return self._rejoin()
            message = self._outbox.get(key)
            if message is not None:
                return Message(meta={**message.meta, "status": "reply"}, tensors=message.tensors)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._cond.wait(remaining)


class SessionLost(Exception):
    """Control flow inside a follower: the leader asked it to rejoin (`instance` is the leader's)."""

    def __init__(self, instance: str) -> None:
        super().__init__(f"rejoin leader instance {instance}")
        self.instance = instance


class FollowerBridge:
    """A follower's end: calls the leader, waiting out lost connections.

    Transport failures are retried (the client re-attests) for up to
    `reconnect_timeout_s`, then LeaderUnreachable. Refusals are raised at once.
    """

    def __init__(
        self, client: AttestedClient, *, reconnect_timeout_s: float = 120.0, poll_s: float = DEFAULT_POLL_S
    ) -> None:
        self.client = client
        self.party = client.party
        self._reconnect_timeout_s = reconnect_timeout_s
        self._call_timeout_s = poll_s + 30.0
        self.session = ""

    def call(self, method: str, meta: dict[str, Any], tensors: dict[str, Any] | None = None) -> Message:
        """One call; a "rejoin" answer raises SessionLost."""
        answer = self.call_raw(method, Message(meta={**meta, "session": self.session}, tensors=tensors or {}))
        if answer.meta.get("status") == "rejoin":
            raise SessionLost(str(answer.meta.get("instance", "")))
        return answer

    def leave(self) -> None:
        """Tell the leader this follower saw the end of the job (the leader may stop then)."""
        try:
            self.client.call(LEAVE, Message(meta={"session": self.session}), timeout_s=self._call_timeout_s)
        except TransportError as exc:  # it stopped without waiting for the answer: the job is done anyway
            log.debug("%s: the leader stopped while this follower left (%s)", self.party, exc.reason)

    def refuse(self, refusal: Rejected) -> None:
        """Tell the leader this follower refuses it, and why, so that it stops at once.

        Best effort, one call: the follower stops with `refusal` whatever the answer (a leader
        that does not hear it still stops when its wait for this follower times out).
        """
        meta = {"check": refusal.check.value, "reason": refusal.reason}
        try:
            self.client.call(REFUSE, Message(meta=meta), timeout_s=self._call_timeout_s)
        except EnclaveflError as exc:
            log.warning("%s: could not tell the leader it is refused (%s)", self.party, exc.reason)

    def call_raw(self, method: str, message: Message) -> Message:
        deadline = time.monotonic() + self._reconnect_timeout_s
        delay = 0.05
        while True:
            try:
                return self.client.call(method, message, timeout_s=self._call_timeout_s)
            except (ConnectFailed, HandshakeFailed, CallFailed) as exc:
                if isinstance(exc, CallFailed) and exc.code not in _RETRYABLE_CODES:
                    raise
                if time.monotonic() + delay > deadline:
                    raise LeaderUnreachable(
                        f"{self.party}: leader {self.client.target} unreachable for {self._reconnect_timeout_s:g} s "
                        f"({method}): {exc.reason}"
                    ) from exc
                log.info("%s: %s to the leader failed (%s); reconnecting", self.party, method, exc.reason)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
