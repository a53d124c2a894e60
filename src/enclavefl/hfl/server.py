"""The parameter server of horizontal FL, served over the attested channel.

The server holds the global model and drives a strategy (any object with the hooks of
`enclavefl.hfl.contract`), and serves these methods to the workers named in the job (any
other party is refused):

* `hfl.join`: the current global state (embedding tables whole) and what the worker needs
  to know (strategy, kind, version, total, evaluation cadence, the round's config). Late
  and returning workers join the same way. Every state reply carries the strategy's
  config for the next round (FedProx: its `mu`).
* `hfl.slot`: long-poll for one of `max_pending_uploads` upload places (a lease).
* `hfl.push`: a contribution at a version, plus the table rows the worker will read next.
  sync-sgd and the round strategies fold it into running weighted sums (never a list of
  contributions) and answer once the step or round closed, with the new state; async-sgd
  steps at once and answers with the state after the step. A contribution for another
  version is refused as stale and answered with the current state.
* `hfl.wait`: long-poll for a version after a given one (or, `rows_only`, just table rows).
* `hfl.eval`: a worker's evaluation statistics of a version it received.
* `hfl.leave`: a worker leaves for good (its privacy budget is spent).

This module is the role: the handlers, the round's bookkeeping (live workers, quorum,
deadlines) and publishing each version. Its parts live beside it: `settings` (checked
once), `driver` (the strategy: configure, collect, aggregate), `evaluation` (pooling the
workers' reports), `run_checkpoint` (sealed checkpoints and resuming), and
`enclavefl.net.flow` (the upload gate and download places).

A step or round closes when every live worker contributed (with at least `min_workers`),
or at `round_timeout_s` with at least `min_workers`; workers that missed it leave the live
set until they call again. Without a quorum the server waits up to `quorum_timeout_s`
more, then fails with `QuorumLost`. The first round of a run starts its clock once
`min_workers` workers joined.

Memory: for strategies with `aggregate_mean` (the weighted-mean ones) contributions are
added into one accumulator as they arrive; other strategies get every contribution of a
round, so the server holds one update per worker until the round closes. Workers upload only
with a lease, so at most `max_pending_uploads` payloads (about one model each) are in
flight, in memory or in the transport, whose buffers grow with every concurrent stream;
the sink refuses to hold more even from a worker that skips the lease. At most
`max_pending_downloads` state replies stream at once. Beyond the served state the server
then holds about 1 accumulator + `max_pending_uploads` payloads, and, while a strategy
steps, what it allocates (FedAvg: one averaged copy). Long-polls hold a server thread
each: give the AttestedServer `max_workers` above the number of workers.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from enclavefl.errors import Check, Rejected, TransportError, UsageError
from enclavefl.hfl import wire
from enclavefl.hfl.checkpoint import CheckpointStore
from enclavefl.hfl.driver import StrategyDriver
from enclavefl.hfl.evaluation import EvalPool, eval_record, parse_report
from enclavefl.hfl.run_checkpoint import RunCheckpoints
from enclavefl.hfl.settings import ServerSettings
from enclavefl.hfl.sparse import pull_rows
from enclavefl.hfl.strategies import StaleContribution
from enclavefl.net.admission import Peer
from enclavefl.net.exchange import Handler
from enclavefl.net.server import AttestedServer
from enclavefl.net.flow import GatedPayload, Places, UploadGate
from enclavefl.net.tensors import Message
from enclavefl.train.metrics import EvalStats
from enclavefl.validate import is_number

__all__ = ["ParameterServer", "QuorumLost"]

log = logging.getLogger("enclavefl.hfl")

# A connected worker that stays this long silent (and 3x longer than the slowest of the
# others) while a round waits for it is reported (capped at a quarter of the round timeout).
_SILENCE_S = 10.0
Evaluate = Callable[[nn.Module], EvalStats]


class QuorumLost(TransportError):
    """Fewer than `min_workers` workers contributed within the round timeout plus the quorum timeout."""


# -- aggregation --------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    """The published state of one version (immutable: replies stream from it)."""

    version: int
    dense: torch.Tensor
    ints: torch.Tensor


@dataclass
class _WorkerCounts:
    joins: int = 0
    contributions: int = 0
    stale: int = 0
    dropped: int = 0

    def to_json(self) -> dict[str, int]:
        return {"joins": self.joins, "contributions": self.contributions, "stale": self.stale, "dropped": self.dropped}


def _push_figures(meta: dict[str, Any]) -> tuple[int, int, float, Any]:
    """A contribution's (version, weight, compute seconds, loss or None), checked."""
    version = wire.meta_int(meta, "version")
    weight = wire.meta_int(meta, "weight", minimum=1)
    compute_s = meta.get("compute_s", 0.0)
    if not is_number(compute_s) or not compute_s >= 0:
        raise UsageError(f"message field 'compute_s' must be a number >= 0, got {compute_s!r}")
    loss = meta.get("loss")
    if loss is not None and not is_number(loss):
        raise UsageError(f"message field 'loss' must be a number, got {loss!r}")
    return version, weight, float(compute_s), loss


# -- the role -------------------------------------------------------------------------


class ParameterServer:
    """Runs a horizontal-FL job's server side until the strategy's version reaches `total`.

    `strategy` is any object with the hooks of `enclavefl.hfl.contract` (a built-in from
    `make_strategy`, or a user's); `model` is the global model, which built-in strategies
    hold themselves (`strategy.model`, the default). `total` is the number of rounds
    (round strategies) or steps (sgd strategies).
    `workers` are the party names allowed to contribute; `min_workers` (default: all) is
    the quorum. `evaluate(model) -> EvalStats` evaluates the server's copy every
    `eval_every` versions and after the last; workers that have held-out data report
    theirs, which the server adds up. Every round or step record and every evaluation
    goes to `on_metrics` (called from `run()`'s thread, never under the server's lock).
    `checkpoints` with `checkpoint_every` seals the state every K versions and after the
    last; `resume=True` continues from the newest checkpoint (a tampered one raises).
    `max_pending_uploads` and `max_pending_downloads` bound concurrent transfers (see the
    module docstring); an upload place not used within `upload_lease_s` is given to
    another worker. Long-polls answer "pending" after `poll_s` and are repeated.
    """

    def __init__(
        self,
        server: AttestedServer,
        strategy: Any,
        *,
        model: nn.Module | None = None,
        workers: Iterable[str],
        total: int,
        min_workers: int | None = None,
        round_timeout_s: float = 300.0,
        quorum_timeout_s: float | None = None,
        evaluate: Evaluate | None = None,
        eval_every: int = 1,
        checkpoints: CheckpointStore | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
        on_metrics: Callable[[dict[str, Any]], None] | None = None,
        max_pending_uploads: int = 1,
        max_pending_downloads: int = 2,
        upload_lease_s: float = 60.0,
        poll_s: float = 10.0,
    ) -> None:
        settings = ServerSettings.check(
            workers=workers, total=total, min_workers=min_workers, round_timeout_s=round_timeout_s,
            quorum_timeout_s=quorum_timeout_s, eval_every=eval_every, checkpoint_every=checkpoint_every,
            max_pending_uploads=max_pending_uploads, max_pending_downloads=max_pending_downloads,
            upload_lease_s=upload_lease_s, poll_s=poll_s,
        )  # fmt: skip
        if resume and checkpoints is None:
            raise UsageError("resume=True needs a checkpoint store")
        model = model if model is not None else getattr(strategy, "model", None)
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"strategy {type(strategy).__name__} holds no model: give ParameterServer(..., model=the global model)"
            )
        self._server = server
        self._model = model
        self._layout = wire.Layout(model)
        self._strategy = StrategyDriver(strategy, model, self._layout)
        self.settings = settings
        self._workers = settings.workers
        self._total = settings.total
        self._min_workers = settings.min_workers
        self._round_timeout_s = settings.round_timeout_s
        self._quorum_timeout_s = settings.quorum_timeout_s
        self._evaluate = evaluate
        self._eval_every = settings.eval_every
        self._checkpoints = RunCheckpoints(checkpoints, settings.checkpoint_every) if checkpoints else None
        self._on_metrics = on_metrics
        self._poll_s = settings.poll_s
        self._upload_places = settings.max_pending_uploads
        self._upload_lease_s = settings.upload_lease_s
        self._leases: dict[str, tuple[str, float]] = {}  # token -> (worker, expiry)
        self._downloads = Places(settings.max_pending_downloads, "max_pending_downloads")
        self._async = self._strategy.asynchronous
        self._unit = self._strategy.unit
        self._incarnation = secrets.token_hex(8)

        self._init_run_state()
        if resume:
            self._restore()
        # The newest version sealed to storage, told to every worker: a server that comes
        # back at an older one lost checkpoints, and the workers that saw it refuse to go on.
        self._durable = -1 if self._resumed_from is None else self._resumed_from
        self._done = False
        self._published_at = self._started
        self._snapshot: _Snapshot | None = None
        with self._cond:
            self._publish_locked(time.monotonic(), initial=True)

        self._told_done: set[str] = set()
        self._register_handlers(server, settings.max_pending_uploads)

    def _init_run_state(self) -> None:
        """The run's changing state (guarded by `_cond`): who is live, this version's
        contributions, evaluations, events, timers and counters."""
        self._cond = threading.Condition()
        self._live: set[str] = set()
        self._evaluators: set[str] = set()
        self._last_seen: dict[str, float] = {}
        self._counts = {w: _WorkerCounts() for w in self._workers}
        self._contributors: dict[str, float] = {}  # worker -> its compute seconds, this version
        # worker -> its training metrics this version (loss, examples, compute_s, bytes_sent).
        self._party_stats: dict[str, dict[str, Any]] = {}
        self._eval_pool = EvalPool(self._round_timeout_s)
        self._evaluations: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._error: BaseException | None = None
        self._deadline: float | None = None
        self._quorum_warned = False
        self._reported_missing: tuple[Any, ...] = ()
        self._async_refused = 0
        self._examples = 0
        self._updates_run = 0
        self._resumed_from: int | None = None
        self._left: dict[str, str] = {}  # worker -> why it left for good (its privacy budget)
        self._stopped: str | None = None
        self._started = time.monotonic()

    def _register_handlers(self, server: AttestedServer, max_pending_uploads: int) -> None:
        """The worker-facing methods; a push's payload waits for an upload place."""
        server.register(wire.JOIN, self._telling(self._on_join))
        server.register(wire.SLOT, self._telling(self._on_slot))
        server.register(wire.PUSH, self._telling(self._on_push),
                        sink=UploadGate(max_pending_uploads, gated=wire.PAYLOAD))  # fmt: skip
        server.register(wire.WAIT, self._telling(self._on_wait))
        server.register(wire.EVAL, self._telling(self._on_eval))
        server.register(wire.LEAVE, self._on_leave)

    # -- public ---------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def version(self) -> int:
        with self._cond:
            return self._strategy.version

    @property
    def rollback_protection(self) -> str:
        """What stops a restarted server from resuming older state than it had sealed:
        "key-broker" (a version register the host cannot roll back), "peer-based" (only
        workers that saw a newer checkpoint refuse) or "none" (no checkpoints)."""
        if self._checkpoints is None:
            return "none"
        return "key-broker" if self._checkpoints.store.freshness is not None else "peer-based"

    def status(self) -> dict[str, Any]:
        """Where the run stands (version, live workers, this version's contributors)."""
        with self._cond:
            return {
                "version": self._strategy.version,
                "total": self._total,
                "done": self._done,
                "live": sorted(self._live),
                "contributors": sorted(self._contributors),
                "resumed_from": self._resumed_from,
            }

    def run(self) -> dict[str, Any]:
        """Serve until the last version and its evaluations; returns the run summary.

        Starts the AttestedServer unless it already is; the caller stops it afterwards
        (a short grace lets the last replies finish).
        """
        if self._server.port == 0:
            self._server.start()
        with self._cond:
            self._started = time.monotonic()
            if self._deadline is None:  # nobody joined yet: the quorum timeout counts from now
                self._published_at = self._started
        log.info(
            "parameter server: %s, version %d of %d, workers %s (quorum %d), round timeout %g s",
            self._strategy.name, self._strategy.version, self._total, list(self._workers),
            self._min_workers, self._round_timeout_s,
        )
        if self.rollback_protection == "peer-based":
            log.warning("checkpoints without a key broker: rollback protection is peer-based only (workers that "
                        "saw a newer checkpoint refuse an older resume; see docs/deploy.md)")
        while True:
            with self._cond:
                self._tick_locked(time.monotonic())
                events, self._events = self._events, []
                finished = self._done and not self._eval_pool.waiting
                if self._error is not None:
                    raise self._error
                if not events and not finished:
                    self._cond.wait(timeout=0.25)
            for event in events:
                if self._on_metrics is not None:
                    self._on_metrics(event)
            if finished and not events:
                break
        return self.summary()

    def linger(self, timeout_s: float) -> list[str]:
        """After run(): go on answering until every worker of the job has been told the run
        is done, for at most `timeout_s`; returns the workers still not told.

        "Told" means a reply that carried the final state and `done`, so the worker stops
        there. A worker cut off near the end, or one that had not joined yet (async-sgd can
        finish before a slow worker starts), otherwise finds the server gone, cannot tell a
        finished job from a lost server, and gives up only after its reconnect window.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if not self._done:
                raise UsageError("linger() is for after run(): the run is not done")
            untold = self._untold_locked()
            if untold and timeout_s > 0:
                log.info("run done; waiting up to %g s for workers %s to hear it", timeout_s, untold)
            while untold and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
                untold = self._untold_locked()
        if untold:
            log.warning("workers %s did not hear that the run is done; they stop after their reconnect window",
                        untold)
        return untold

    def _untold_locked(self) -> list[str]:
        return [w for w in self._workers if w not in self._told_done]

    def summary(self) -> dict[str, Any]:
        with self._cond:
            final: dict[str, Any] = {}
            for record in self._evaluations:
                if record["version"] == self._strategy.version:
                    final[record["where"]] = {k: v for k, v in record.items() if k not in ("event", "where")}
            return {
                "strategy": self._strategy.name,
                "version": self._strategy.version,
                "total": self._total,
                "resumed_from": self._resumed_from,
                "rollback_protection": self.rollback_protection,
                "updates_run": self._updates_run,
                "async_refused": self._async_refused,
                "workers": {w: c.to_json() for w, c in self._counts.items()},
                "evaluations": list(self._evaluations),
                "final_metrics": final,
                "elapsed_s": time.monotonic() - self._started,
                **({"left": dict(self._left)} if self._left else {}),
                **({"stopped": self._stopped} if self._stopped else {}),
            }

    # -- handlers ---------------------------------------------------------------------

    def _check_party(self, peer: Peer) -> str:
        if peer.party not in self._workers:
            raise Rejected(
                f"party {peer.party!r} is not a worker of this job; workers: {list(self._workers)}", check=Check.PARTY
            )
        return peer.party

    def _telling(self, handler: Handler) -> Handler:
        """`handler`, noting which workers a reply told that the run is done (for linger).

        Only a reply with the final state counts: a worker given `done` without it would
        still have to fetch the state, from a server that may have stopped by then.
        """

        def handle(peer: Peer, request: Message) -> Message:
            reply = handler(peer, request)
            if reply.meta.get("done") is True and wire.DENSE in reply.tensors:
                with self._cond:
                    self._told_done.add(peer.party)
                    self._cond.notify_all()
            return reply

        return handle

    def _on_join(self, peer: Peer, request: Message) -> Message:
        worker = self._check_party(peer)
        with self._cond:
            if worker in self._left:
                # A restarted worker would start a fresh accountant: its budget is spent.
                raise Rejected(f"worker {worker} left this run ({self._left[worker]}); it may not rejoin",
                               check=Check.PRIVACY)
        protocol = request.meta.get("protocol")
        if protocol != wire.PROTOCOL:
            raise UsageError(f"hfl protocol {protocol!r} not supported; this server speaks {wire.PROTOCOL}")
        evaluates = request.meta.get("evaluates") is True
        reply = self._download(lambda: self._join_reply_locked(worker, evaluates))
        log.info("worker %s joined at version %d", worker, reply.meta["version"])
        return reply

    def _join_reply_locked(self, worker: str, evaluates: bool) -> Message:
        now = time.monotonic()
        self._seen_locked(worker, now)
        self._counts[worker].joins += 1
        if evaluates:
            self._evaluators.add(worker)
        else:
            self._evaluators.discard(worker)
        if self._deadline is None and len(self._live) >= self._min_workers:
            # The first round of a run starts its clock once a quorum is there.
            self._deadline = now + self._round_timeout_s
            self._published_at = now
        snapshot = self._snapshot
        assert snapshot is not None
        tensors: dict[str, Any] = {wire.DENSE: snapshot.dense, wire.INTS: snapshot.ints}
        for name in self._layout.tables:
            tensors[f"table/{name}"] = self._table(name).detach().clone()
        meta = {
            **self._reply_meta_locked("joined"),
            "protocol": wire.PROTOCOL,
            "strategy": self._strategy.name,
            "kind": self._strategy.kind,
            "total": self._total,
            "eval_every": self._eval_every,
            "poll_s": self._poll_s,
            "layout": self._layout.describe(),
        }
        meta["version"] = snapshot.version
        return Message(meta, tensors)

    def _on_leave(self, peer: Peer, request: Message) -> Message:
        """A worker leaves for good (its accountant reached the privacy budget). When too few
        workers remain for a quorum, the run stops at the current version, checkpoint sealed."""
        worker = self._check_party(peer)
        reason = request.meta.get("reason")
        if not isinstance(reason, str) or not reason or len(reason) > 200 or not reason.isprintable():
            raise UsageError(f"hfl.leave: reason must be 1..200 printable characters, got {reason!r}")
        with self._cond:
            now = time.monotonic()
            self._left[worker] = reason
            self._live.discard(worker)
            self._evaluators.discard(worker)
            self._told_done.add(worker)  # it wants no final state
            log.warning("worker %s left the run at version %d: %s", worker, self._strategy.version, reason)
            remaining = [w for w in self._workers if w not in self._left]
            if self._done:
                pass
            elif len(remaining) < self._min_workers:
                self._guarded(self._stop_locked, now, reason,
                              f"too few workers remain for a quorum of {self._min_workers}")
            else:
                self._close_if_complete_locked(now)
            return Message(self._reply_meta_locked("left"))

    def _stop_locked(self, now: float, reason: str, why: str) -> None:
        """End the run before its last version: the current state is sealed and final."""
        version = self._strategy.version
        log.warning("stopped: %s (version %d of %d; %s)", reason, version, self._total, why)
        self._stopped = reason
        # Publishing this version evaluated and sealed it unless it was off their period.
        if version == 0 or version % self._eval_every != 0:
            self._evaluate_locked(version, now)
        if self._checkpoints is not None and (version == 0 or not self._checkpoints.due(version, False)):
            self._save_locked(version)
        self._done = True
        self._cond.notify_all()

    def _on_slot(self, peer: Peer, request: Message) -> Message:
        """Grant an upload place (long-poll): at most `max_pending_uploads` uploads at once."""
        worker = self._check_party(peer)
        version = wire.meta_int(request.meta, "version")
        with self._cond:
            now = time.monotonic()
            self._seen_locked(worker, now)
            end = now + self._poll_s
            while not self._done:
                if not self._async and version != self._strategy.version:
                    return Message(self._reply_meta_locked("stale"))
                now = time.monotonic()
                for token, (holder, expiry) in list(self._leases.items()):
                    if holder == worker:  # a retried request: the same place
                        self._leases[token] = (worker, now + self._upload_lease_s)
                        return Message({**self._reply_meta_locked("granted"), "lease": token})
                    if expiry < now:
                        del self._leases[token]
                        log.warning("worker %s held an upload place for %g s without uploading: place freed",
                                    holder, self._upload_lease_s)
                if len(self._leases) < self._upload_places:
                    token = secrets.token_hex(8)
                    self._leases[token] = (worker, now + self._upload_lease_s)
                    return Message({**self._reply_meta_locked("granted"), "lease": token})
                if now >= end:
                    return Message(self._reply_meta_locked("pending"))
                self._cond.wait(min(end, *(e for _, e in self._leases.values())) - now)
        # The run ended: the reply carries the final state, so the worker stops here.
        return self._download(lambda: self._state_reply_locked("done", {}))

    def _on_push(self, peer: Peer, request: Message) -> Message:
        payload = request.tensors.pop(wire.PAYLOAD, None)
        try:
            worker = self._check_party(peer)
            if not isinstance(payload, GatedPayload):
                raise UsageError("a contribution needs a payload tensor")
            version, weight, compute_s, loss = _push_figures(request.meta)
            uploaded = int(payload.tensor.nbytes) + wire.message_bytes(request.tensors)
            want = wire.parse_want(self._layout, request.tensors)
            for name in [n for n in request.tensors if n.startswith("want/")]:
                del request.tensors[name]
            unpacked = self._layout.unpack_contribution(request.tensors, payload.tensor)
            with self._cond:
                now = time.monotonic()
                self._seen_locked(worker, now)
                if self._done:
                    status = "done"
                elif self._async:
                    status = self._apply_async_locked(worker, unpacked, version, weight, now)
                else:
                    status = self._fold_locked(worker, unpacked, version, weight, compute_s, now)
                    if status == "accepted":
                        self._party_stats[worker] = {"loss": loss, "examples": weight, "compute_s": compute_s,
                                                     "bytes_sent": uploaded}
                # Give the upload place and the payload's memory back before waiting for the others.
                lease = request.meta.get("lease")
                if isinstance(lease, str) and self._leases.get(lease, ("", 0.0))[0] == worker:
                    del self._leases[lease]
                del unpacked
                request.tensors.clear()
                payload.release()
                self._cond.notify_all()
                if status == "accepted" and not self._async:
                    self._close_if_complete_locked(now)
                if status == "accepted":
                    status = "ok" if self._async else self._wait_locked(version)
                if status == "pending":
                    return Message(self._reply_meta_locked(status))
            return self._download(lambda: self._state_reply_locked(status, want))
        finally:
            if isinstance(payload, GatedPayload):
                payload.release()

    def _on_wait(self, peer: Peer, request: Message) -> Message:
        worker = self._check_party(peer)
        after = wire.meta_int(request.meta, "after", minimum=-1)
        want = wire.parse_want(self._layout, request.tensors)
        if request.meta.get("rows_only") is True:
            return self._download(lambda: self._rows_reply_locked(worker, want))
        with self._cond:
            self._seen_locked(worker, time.monotonic())
            status = self._wait_locked(after) if after >= self._strategy.version else "ok"
            if status == "pending":
                return Message(self._reply_meta_locked(status))
        return self._download(lambda: self._state_reply_locked(status, want))

    def _rows_reply_locked(self, worker: str, want: Mapping[str, torch.Tensor]) -> Message:
        self._seen_locked(worker, time.monotonic())
        rows = {name: pull_rows(self._table(name), index) for name, index in want.items()}
        return Message(self._reply_meta_locked("rows"), wire.rows_tensors("rows", rows))

    def _on_eval(self, peer: Peer, request: Message) -> Message:
        worker = self._check_party(peer)
        key = wire.meta_int(request.meta, "key", minimum=1)
        report = parse_report(request)
        with self._cond:
            self._seen_locked(worker, time.monotonic())
            if not self._eval_pool.report(worker, key, report):
                return Message(self._reply_meta_locked("ignored"))
            self._cond.notify_all()
            return Message(self._reply_meta_locked("recorded"))

    def _download(self, build: Callable[[], Message]) -> Message:
        """A reply built under the lock once a download place is free; the place is freed
        with the reply message, i.e. when its last frame went to the transport."""
        slot = self._downloads.take()
        try:
            with self._cond:
                message = build()
        except BaseException:
            slot.release()
            raise
        weakref.finalize(message, slot.release)
        return message

    # -- state changes (all under self._cond) ------------------------------------------

    def _seen_locked(self, worker: str, now: float) -> None:
        if worker not in self._live and worker in self._last_seen:
            log.info("worker %s is back (version %d)", worker, self._strategy.version)
        self._last_seen[worker] = now
        self._live.add(worker)

    def _fold_locked(
        self, worker: str, unpacked: wire.Unpacked, version: int, weight: int, compute_s: float, now: float
    ) -> str:
        if version != self._strategy.version:
            self._counts[worker].stale += 1
            log.info(
                "worker %s sent a contribution for version %d, the server is at %d: refused as stale",
                worker, version, self._strategy.version,
            )
            return "stale"
        if worker in self._contributors:  # a retried push: already counted
            return "accepted"
        assert self._snapshot is not None
        self._strategy.add(worker, unpacked, weight, version, self._snapshot.dense)
        self._examples += weight
        self._contributors[worker] = compute_s
        self._counts[worker].contributions += 1
        return "accepted"

    def _close_if_complete_locked(self, now: float) -> None:
        if self._live <= set(self._contributors) and len(self._contributors) >= self._min_workers:
            self._guarded(self._close_locked, now, "all live workers")

    def _apply_async_locked(self, worker: str, unpacked: wire.Unpacked, version: int, batch: int, now: float) -> str:
        if version > self._strategy.version:  # from a version this server never reached (it restarted)
            self._counts[worker].stale += 1
            log.info("worker %s contributed at version %d, the server is at %d", worker, version,
                     self._strategy.version)  # fmt: skip
            return "stale"
        try:
            accepted, metrics = self._strategy.apply_async(worker, unpacked, batch, version)
        except StaleContribution as exc:
            self._counts[worker].stale += 1
            log.info("worker %s: %s", worker, exc.reason)
            return "stale"
        if not accepted:
            self._counts[worker].stale += 1
            self._async_refused += 1
            log.debug("worker %s: gradient refused (%s)", worker, metrics)
            return "stale"
        self._counts[worker].contributions += 1
        self._updates_run += 1
        self._guarded(self._publish_locked, now)
        return "accepted"

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a state change; a failure there ends the run (run() raises it)."""
        try:
            fn(*args)
        except Exception as exc:
            self._error = exc
            self._cond.notify_all()
            # The server's own failure (e.g. its checkpoint key), not the caller's request.
            raise TransportError(f"the parameter server failed: {exc}") from exc
        except BaseException as exc:
            self._error = exc
            self._cond.notify_all()
            raise

    def _snapshot_bytes(self) -> int:
        """Bytes of the global state a worker downloads (the published dense and integer tensors)."""
        snapshot = self._snapshot
        if snapshot is None:
            return 0
        return int(snapshot.dense.nbytes) + int(snapshot.ints.nbytes)

    def _close_locked(self, now: float, reason: str) -> None:
        version = self._strategy.version
        contributors = sorted(self._contributors)
        dropped = sorted(self._live - set(contributors))
        for worker in dropped:
            self._counts[worker].dropped += 1
            log.warning("worker %s missed %s %d: dropped until it calls again", worker, self._unit, version)
        examples, self._examples = self._examples, 0
        assert self._snapshot is not None
        metrics = self._strategy.close(self._snapshot.dense)
        compute = max(self._contributors.values())
        self._contributors = {}
        self._live = set(contributors)
        self._updates_run += 1
        record = {
            "event": self._unit,
            "version": self._strategy.version,
            "contributors": contributors,
            "dropped": dropped,
            "examples": examples,
            "wall_s": now - self._published_at,
            "max_compute_s": compute,
            "closed_by": reason,
            **{k: v for k, v in metrics.items() if k not in ("event", "version")},
        }
        self._events.append(record)
        state_bytes = self._snapshot_bytes()
        for worker in contributors:  # each party's own figures, next to the global evaluation
            stats = {k: v for k, v in self._party_stats.pop(worker, {}).items() if v is not None}
            self._events.append({"event": "party", "party": worker, "version": self._strategy.version,
                                 **stats, "bytes_received": state_bytes})
        self._party_stats.clear()
        periodic = self._unit == "round" or self._strategy.version % self._eval_every == 0
        level = logging.INFO if periodic else logging.DEBUG
        log.log(
            level, "%s %d/%d closed (%s): %d worker(s), %d examples, %.3f s%s",
            self._unit, self._strategy.version, self._total, reason, len(contributors), examples,
            record["wall_s"], f", dropped {dropped}" if dropped else "",
        )
        self._publish_locked(now)

    def _publish_locked(self, now: float, *, initial: bool = False) -> None:
        """Make the strategy's current version the served one (and evaluate, checkpoint)."""
        version = self._strategy.version
        # Replies in flight keep their own reference: dropping ours first avoids two copies.
        self._snapshot = None
        dense, ints = self._layout.pack_state(self._model)
        self._snapshot = _Snapshot(version, dense, ints)
        if version < self._total:
            self._strategy.configure()
        self._published_at = now
        self._quorum_warned = False
        if not initial:
            self._deadline = now + self._round_timeout_s
            last = version >= self._total
            if version % self._eval_every == 0 or last:
                self._evaluate_locked(version, now)
            if self._async and version % self._eval_every == 0:
                self._events.append({"event": "progress", "version": version, "refused": self._async_refused})
                log.info("step %d/%d (async, %d refused so far)", version, self._total, self._async_refused)
            if self._checkpoints is not None and self._checkpoints.due(version, last):
                self._save_locked(version)
        if version >= self._total:
            if not self._done:
                log.info("reached version %d of %d", version, self._total)
            self._done = True
        elif not self._done and (reason := self._strategy.stop_reason()) is not None:
            self._stop_locked(now, reason, f"the strategy {self._strategy.name} ends the run")
            return
        self._cond.notify_all()

    def _evaluate_locked(self, version: int, now: float) -> None:
        if self._evaluate is not None:
            stats = self._evaluate(self._model)
            self._record_eval("server", version, stats.summary(), stats.count, parties=1)
        elif self._strategy.evaluates:
            metrics = self._strategy.evaluate()
            if metrics is not None:
                count = int(metrics.get("examples", 0))
                self._record_eval("server", version, metrics, count, parties=1)
        self._eval_pool.open(version, self._evaluators & self._live, now)

    def _record_eval(self, where: str, version: int, metrics: Mapping[str, float], count: int, *, parties: int) -> None:
        self._add_eval_record(eval_record(where, version, metrics, count, parties=parties))

    def _add_eval_record(self, record: dict[str, Any]) -> None:
        self._evaluations.append(record)
        self._events.append(record)

    def _save_locked(self, version: int) -> None:
        assert self._checkpoints is not None
        self._checkpoints.save(version, self._strategy, self._evaluations,
                               {w: c.to_json() for w, c in self._counts.items()})  # fmt: skip
        self._durable = version

    def _restore(self) -> None:
        assert self._checkpoints is not None
        restored = self._checkpoints.restore(self._strategy)
        if restored is None:
            return
        self._evaluations = restored.evaluations
        for worker, counts in restored.workers.items():
            if worker in self._counts:
                self._counts[worker] = _WorkerCounts(**counts)
        self._resumed_from = restored.version

    def _wait_locked(self, version: int) -> str:
        """Wait until the served version passes `version` (or the poll ends)."""
        end = time.monotonic() + self._poll_s
        while self._strategy.version <= version and not self._done and self._error is None:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return "pending"
            self._cond.wait(remaining)
        if self._error is not None:
            raise TransportError(f"the parameter server failed: {self._error}")
        return "ok"

    def _reply_meta_locked(self, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "version": self._strategy.version,
            "done": self._done,
            "incarnation": self._incarnation,
            "config": self._strategy.config,
            "durable": self._durable,
        }

    def _state_reply_locked(self, status: str, want: Mapping[str, torch.Tensor]) -> Message:
        meta = self._reply_meta_locked(status)
        if status == "pending":
            return Message(meta)
        snapshot = self._snapshot
        assert snapshot is not None
        rows = {name: pull_rows(self._table(name), index) for name, index in want.items()}
        meta["version"] = snapshot.version
        return Message(meta, {wire.DENSE: snapshot.dense, wire.INTS: snapshot.ints, **wire.rows_tensors("rows", rows)})

    def _table(self, name: str) -> torch.Tensor:
        return self._model.get_parameter(name)

    # -- the run loop's periodic checks ------------------------------------------------

    def _tick_locked(self, now: float) -> None:
        if not self._done:
            if self._async:
                self._drop_idle_locked(now)
            else:
                self._report_missing_locked(now)
                self._check_deadline_locked(now)
            if now > self._published_at + self._round_timeout_s + self._quorum_timeout_s and self._error is None:
                self._error = QuorumLost(
                    f"no progress at version {self._strategy.version} for "
                    f"{self._round_timeout_s + self._quorum_timeout_s:g} s: contributors "
                    f"{sorted(self._contributors)}, live {sorted(self._live)}, quorum {self._min_workers}"
                )
        for record in self._eval_pool.settle(now, self._live):
            self._add_eval_record(record)

    def _report_missing_locked(self, now: float) -> None:
        """Say which workers the step or round waits for, and how long the server waits.

        Before the first round: at once, every time the set of workers still to join
        changes. In a round: at once when the only workers left are not connected and the
        quorum needs them; when they are connected but silent for far longer than the others
        took (3x the slowest contributor, at least `silence_s`), since a worker that died
        while training cannot be told from a slow one any sooner.
        """
        give_up_s = self._published_at + self._round_timeout_s + self._quorum_timeout_s - now
        quorum = f"quorum {self._min_workers} of {len(self._workers)} (strategy.min_workers, default: every worker)"
        if self._deadline is None:
            absent = tuple(w for w in self._workers if w not in self._live)
            if absent and self._reported_missing != ("join", absent):
                self._reported_missing = ("join", absent)
                log.info(
                    "waiting for worker(s) %s to join (%d of %d joined): the first %s starts with a %s; "
                    "without it the server gives up in %.0f s",
                    list(absent), len(self._workers) - len(absent), len(self._workers), self._unit, quorum, give_up_s,
                )
            return
        if not self._contributors:
            return
        waiting = [w for w in self._workers if w not in self._contributors]
        blocked = self._live <= set(self._contributors) and len(self._contributors) < self._min_workers
        gone = [w for w in waiting if w not in self._live] if blocked else []
        slowest = max(self._contributors.values())
        silence_s = max(min(_SILENCE_S, self._round_timeout_s / 4), 3 * slowest)
        silent = [
            w for w in waiting
            if w in self._live and now - max(self._last_seen.get(w, now), self._published_at) > silence_s
        ]
        if gone:
            missing, why = gone, "not connected"
        elif silent:
            missing, why = silent, f"silent for over {silence_s:.0f} s; the others took at most {slowest:.1f} s"
        else:
            return
        key = ("round", self._strategy.version, tuple(missing))
        if self._reported_missing == key:
            return
        self._reported_missing = key
        if len(self._contributors) >= self._min_workers:
            then = f"at the round timeout in {max(self._deadline - now, 0):.0f} s it closes without them"
        else:
            then = f"it cannot close without them ({quorum}); the server gives up in {give_up_s:.0f} s"
        log.warning(
            "%s %d: waiting for worker(s) %s (%s); %d of %d contributed: %s",
            self._unit, self._strategy.version + 1, missing, why, len(self._contributors), len(self._workers), then,
        )

    def _check_deadline_locked(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return
        if self._contributors and len(self._contributors) >= self._min_workers:
            self._guarded(self._close_locked, now, "timeout")
        elif not self._quorum_warned:
            self._quorum_warned = True
            log.warning(
                "%s %d: timeout with %d of the %d required worker(s) (%s); waiting up to %g s for a quorum",
                self._unit, self._strategy.version + 1, len(self._contributors), self._min_workers,
                sorted(self._contributors), self._quorum_timeout_s,
            )

    def _drop_idle_locked(self, now: float) -> None:
        for worker in sorted(self._live):
            if now - self._last_seen.get(worker, now) > self._round_timeout_s:
                self._live.discard(worker)
                self._counts[worker].dropped += 1
                log.warning("worker %s silent for %g s: dropped until it calls again", worker, self._round_timeout_s)
