"""A horizontal-FL worker: trains on its own rows and sends only gradients or deltas.

The worker joins the parameter server (getting the global state and the strategy's
kind), then loops until the server says the run is done:

* sgd strategies: one batch per step: gradients at the global version, pushed with the
  table rows the *next* batch reads; the reply is the next global state with those rows.
* round strategies: `local_epochs` over its rows with local SGD (plus the FedProx term when
  the server's strategy has one), then the parameter deltas, pushed with the rows its
  training data reads.

Each push first waits for an upload place (`hfl.slot`), which bounds the server's memory.

Record-level differential privacy: with `privacy` (an `enclavefl.privacy.dpsgd.DpSgd`,
extra `[dp]`) local training is DP-SGD, and before each round the worker checks that the
round's steps keep its accountant within the policy's budget; a round that would not is
not trained: the worker stops (`stopped: privacy budget`) and sends nothing more.

Evaluation: with `eval_data` the worker evaluates every global state the server asks for
(every `eval_every` versions and the last) and sends the statistics, never the rows.

Faults: a call that fails after the client's own retries (server restarted, network
gone) makes the worker join again with backoff for up to `reconnect_timeout_s`, then
continue from the server's current version; an interrupted contribution is simply lost.
A refusal by the server (attestation, policy, party not in the job) is raised at once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from enclavefl.data.tensors import batch_indices
from enclavefl.errors import TransportError, UsageError
from enclavefl.hfl import wire
from enclavefl.hfl.sparse import SparseRows, write_rows
from enclavefl.hfl.state import buffer_names, model_state
from enclavefl.hfl.strategies import (
    GradContribution,
    UpdateContribution,
    fedprox_penalty,
    grad_contribution,
    update_contribution,
)
from enclavefl.net.client import AttestedClient
from enclavefl.net.errors import ConnectFailed
from enclavefl.net.tensors import Message
from enclavefl.train.losses import default_loss
from enclavefl.train.metrics import AUC_BINS, EvalStats, eval_stats

log = logging.getLogger("enclavefl.hfl")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RowsOf = Callable[[Sequence[torch.Tensor]], Mapping[str, torch.Tensor]]


def as_tensors(what: str, data: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """Model inputs then labels, as tensors with the same number of rows (at least one)."""
    tensors = tuple(torch.as_tensor(t) for t in data)
    if len(tensors) < 2:
        raise UsageError(f"{what} must hold the model inputs and then the labels, got {len(tensors)} tensor(s)")
    rows = {int(t.shape[0]) for t in tensors}
    if len(rows) != 1 or 0 in rows:
        raise UsageError(f"{what}: tensors must have the same number of rows (>= 1), got {sorted(rows)}")
    return tensors


def evaluate(
    model: nn.Module, data: Sequence[Any], *, batch_size: int = 1024, auc_bins: int | None = AUC_BINS
) -> EvalStats:
    """Evaluation statistics of `model` on (inputs..., labels), in eval mode, batch by batch.

    Used by workers on their held-out rows and usable as the server's `evaluate`.
    """
    tensors = as_tensors("evaluation data", data)
    inputs, labels = tensors[:-1], tensors[-1]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.cat(
                [model(*(t[start : start + batch_size] for t in inputs)) for start in range(0, len(labels), batch_size)]
            )
    finally:
        model.train(was_training)
    return eval_stats(logits, labels, auc_bins=auc_bins)


def embedding_rows(model: nn.Module) -> RowsOf:
    """Discovers the table rows a batch reads by running the model on it (no grad, eval mode).

    Costs one forward pass per batch; pass `rows_of` to `Worker` to name the rows directly
    (e.g. for DLRM: `{f"embeddings.{i}.weight": sparse[:, i]}`).
    """
    modules = {
        f"{prefix}.weight" if prefix else "weight": module
        for prefix, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
    }

    def rows_of(inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        seen: dict[str, list[torch.Tensor]] = {}

        def recorder(name: str) -> Callable[..., None]:
            def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
                seen.setdefault(name, []).append(args[0].detach().reshape(-1).to(torch.int64))

            return record

        handles = [m.register_forward_pre_hook(recorder(name)) for name, m in modules.items()]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(*inputs)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        return {name: torch.cat(parts) for name, parts in seen.items()}

    return rows_of


class Worker:
    """One worker of a horizontal-FL job, connected to the parameter server by `client`.

    `train` and `eval_data` are (inputs..., labels) tensors; the model is called as
    `model(*inputs)` and returns logits. `lr`, `momentum`, `weight_decay` and
    `local_epochs` drive local training in round strategies (sgd strategies step on the
    server). `rows_of(inputs)` names the embedding-table rows a batch reads (default:
    discovered with `embedding_rows`). Local evaluations and training records go to
    `on_metrics`; `traffic` keeps the bytes and table rows of the last 1000 pushes.
    """

    def __init__(
        self,
        client: AttestedClient,
        model: nn.Module,
        train: Sequence[Any],
        *,
        batch_size: int,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        local_epochs: int = 1,
        eval_data: Sequence[Any] | None = None,
        loss_fn: LossFn = default_loss,
        rows_of: RowsOf | None = None,
        seed: int = 0,
        shuffle: bool = True,
        eval_batch_size: int = 1024,
        reconnect_timeout_s: float = 300.0,
        call_timeout_s: float = 600.0,
        on_metrics: Callable[[dict[str, Any]], None] | None = None,
        privacy: Any = None,
    ) -> None:
        sizes = {"batch_size": batch_size, "local_epochs": local_epochs, "eval_batch_size": eval_batch_size}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be an int >= 1, got {value!r}")
        if not lr > 0 or not 0 <= momentum < 1 or not weight_decay >= 0:
            raise UsageError(
                f"local SGD needs lr > 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}"
            )
        self.party = client.party
        self._client = client
        self._model = model
        self._layout = wire.Layout(model)
        self._train = as_tensors("training data", train)
        self._eval = as_tensors("evaluation data", eval_data) if eval_data is not None else None
        self._batch_size = batch_size
        self._lr, self._momentum, self._weight_decay = float(lr), float(momentum), float(weight_decay)
        self._local_epochs = local_epochs
        self._loss_fn = loss_fn
        self._rows_of = rows_of or (embedding_rows(model) if self._layout.tables else None)
        self._seed = seed
        self._shuffle = shuffle
        self._eval_batch_size = eval_batch_size
        self._reconnect_timeout_s = reconnect_timeout_s
        self._call_timeout_s = call_timeout_s
        self._on_metrics = on_metrics
        self._privacy = privacy
        self.stopped: str | None = None
        # What the server told us at join.
        self._incarnation: str | None = None
        self._kind = "grad"
        self._total = 0
        self._eval_every = 1
        self._proximal_mu = 0.0
        # Progress and accounting.
        self._version = -1
        self._done = False
        self._last_eval_key = 0
        self._eval_rows: dict[str, torch.Tensor] | None = None
        self._counts = {"contributions": 0, "stale": 0, "rejoins": 0, "pushes": 0}
        self._bytes = {"sent": 0, "received": 0}
        self._rows_sent = {name: 0 for name in self._layout.tables}
        self._rows_received = {name: 0 for name in self._layout.tables}
        self.traffic: deque[dict[str, Any]] = deque(maxlen=1000)
        self.evaluations: list[dict[str, Any]] = []

    # -- public -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train until the server's run is done; returns this worker's summary."""
        self._apply_state(self._join(None))
        self._maybe_evaluate()
        if self._kind == "grad":
            if self._privacy is not None:
                raise UsageError("record-level DP-SGD trains in rounds: use fedavg, fedprox or fedadam")
            self._run_sgd()
        else:
            self._run_rounds()
        log.info("party %s done at version %d (%d contributions)",
                 self.party, self._version, self._counts["contributions"])
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {
            "party": self.party,
            "version": self._version,
            "done": self._done,
            **self._counts,
            **({"privacy": self._privacy.report()} if self._privacy is not None else {}),
            **({"stopped": self.stopped} if self.stopped else {}),
            "bytes_sent": self._bytes["sent"],
            "bytes_received": self._bytes["received"],
            "rows_sent": dict(self._rows_sent),
            "rows_received": dict(self._rows_received),
            "evaluations": list(self.evaluations),
        }

    # -- training loops -------------------------------------------------------------------

    def _run_sgd(self) -> None:
        batches = self._batch_stream()
        batch = next(batches)
        while not self._done:
            started = time.perf_counter()
            contribution, loss = self._gradient(batch)
            compute_s = time.perf_counter() - started
            following = next(batches)
            want = self._rows_of(following[:-1]) if self._rows_of is not None else {}
            self._push(contribution, want, compute_s)
            log.debug("party %s: step at version %d, loss %.4f, %.3f s",
                      self.party, contribution.version, loss, compute_s)
            batch = following
            self._maybe_evaluate()

    def _run_rounds(self) -> None:
        want = self._rows_of_all(self._train) if self._rows_of is not None else {}
        while not self._done:
            if self._privacy is not None and not self._privacy.fits(self._round_steps()):
                self.stopped = "privacy budget"
                log.warning("party %s: stopped: privacy budget (epsilon %.3f spent; another round would exceed %g)",
                            self.party, self._privacy.epsilon, self._privacy.max_epsilon)
                self._emit({"event": "stopped", "party": self.party, "version": self._version,
                            "reason": "privacy budget", **self._privacy.report()})  # fmt: skip
                self._leave("privacy budget")
                return
            version = self._version
            start = model_state(self._model)
            started = time.perf_counter()
            loss = self._train_round(start)
            compute_s = time.perf_counter() - started
            contribution = update_contribution(
                self._model, start, worker=self.party, num_examples=len(self._train[-1]), version=version
            )
            del start
            private = self._privacy.report() if self._privacy is not None else {}
            self._emit({"event": "train", "party": self.party, "version": version, "loss": loss,
                        "compute_s": compute_s, **private})  # fmt: skip
            log.info("party %s: round %d/%d trained in %.2f s (loss %.4f)",
                     self.party, version + 1, self._total, compute_s, loss)
            self._push(contribution, want, compute_s)
            self._maybe_evaluate()

    def _batch_stream(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, rows = 0, len(self._train[-1])
        while True:
            for index in batch_indices(rows, self._batch_size, shuffle=self._shuffle, seed=self._seed + epoch):
                picked = torch.from_numpy(index)
                yield tuple(t[picked] for t in self._train)
            epoch += 1

    def _gradient(self, batch: tuple[torch.Tensor, ...]) -> tuple[GradContribution, float]:
        model = self._model
        model.train()
        model.zero_grad(set_to_none=True)
        buffers = dict(model.named_buffers())
        start = {name: buffers[name].detach().clone() for name in buffer_names(model)}
        loss = self._loss_fn(model(*batch[:-1]), batch[-1])
        loss.backward()
        contribution = grad_contribution(
            model, start, worker=self.party, batch_size=len(batch[-1]), version=self._version
        )
        return contribution, float(loss.detach())

    def _round_steps(self) -> int:
        return self._privacy.steps_per_epoch * self._local_epochs

    def _train_round(self, start: Mapping[str, torch.Tensor]) -> float:
        model = self._model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self._lr, momentum=self._momentum, weight_decay=self._weight_decay)
        if self._privacy is not None:
            mu = self._proximal_mu
            penalty = (lambda: fedprox_penalty(model, start, mu)) if mu > 0 else None
            return self._privacy.train(optimizer, epochs=self._local_epochs, loss_fn=self._loss_fn, penalty=penalty)
        model.train()
        total, batches = 0.0, 0
        rows = len(self._train[-1])
        for epoch in range(self._local_epochs):
            seed = self._seed + self._version * self._local_epochs + epoch
            for index in batch_indices(rows, self._batch_size, shuffle=self._shuffle, seed=seed):
                batch = [t[torch.from_numpy(index)] for t in self._train]
                optimizer.zero_grad(set_to_none=True)
                loss = self._loss_fn(model(*batch[:-1]), batch[-1])
                if self._proximal_mu > 0:
                    loss = loss + fedprox_penalty(model, start, self._proximal_mu)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
        return total / max(batches, 1)

    def _rows_of_all(self, data: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The union of the rows every batch of `data` reads."""
        assert self._rows_of is not None
        found: dict[str, list[torch.Tensor]] = {}
        inputs = data[:-1]
        for start in range(0, len(data[-1]), self._eval_batch_size):
            for name, index in self._rows_of([t[start : start + self._eval_batch_size] for t in inputs]).items():
                found.setdefault(name, []).append(torch.unique(index.reshape(-1)))
        return {name: torch.unique(torch.cat(parts)) for name, parts in found.items()}

    # -- talking to the server ------------------------------------------------------------

    def _push(
        self, contribution: GradContribution | UpdateContribution, want: Mapping[str, torch.Tensor], compute_s: float
    ) -> None:
        """Get an upload place, send the contribution, load the state the server answers with."""
        version = contribution.version
        lease = self._call(wire.SLOT, Message({"version": version}))
        while lease.meta.get("status") == "pending":
            lease = self._call(wire.SLOT, Message({"version": version}))
        if lease.meta.get("status") != "granted":
            # The server moved on (or restarted): continue from its current state.
            if lease.meta.get("status") == "stale":
                self._counts["stale"] += 1
            reply = lease
            if wire.DENSE not in reply.tensors:  # a rejoin and "done" carry the state already
                reply = self._call(wire.WAIT, Message({"after": -1}, wire.want_tensors(want)))
            self._apply_state(reply)
            return
        tensors = {**wire.want_tensors(want), **self._layout.pack_contribution(contribution)}
        meta = {"version": version, "weight": contribution.weight, "compute_s": compute_s, "lease": lease.meta["lease"]}
        sent = {name: int(tensors[f"index/{name}"].numel()) for name in self._layout.tables}
        self._counts["pushes"] += 1
        reply = self._call(wire.PUSH, Message(meta, tensors))
        record: dict[str, Any] = {"version": version, "bytes_sent": wire.message_bytes(tensors), "rows_sent": sent}
        del tensors
        received = wire.message_bytes(reply.tensors)
        while reply.meta.get("status") == "pending":
            reply = self._call(wire.WAIT, Message({"after": version}, wire.want_tensors(want)))
            received += wire.message_bytes(reply.tensors)
        status = reply.meta.get("status")
        if status == "ok":
            self._counts["contributions"] += 1
            for name, count in sent.items():
                self._rows_sent[name] += count
        elif status == "stale":
            self._counts["stale"] += 1
            log.info("party %s: contribution at version %d refused as stale; continuing at version %s",
                     self.party, version, reply.meta.get("version"))
        record["status"] = status
        record["bytes_received"] = received
        record["rows_received"] = {
            name: int(reply.tensors[f"rows/{name}/index"].numel()) if f"rows/{name}/index" in reply.tensors else 0
            for name in self._layout.tables
        }
        self.traffic.append(record)
        self._apply_state(reply)

    def _leave(self, reason: str) -> None:
        """Tell the server this worker is gone for good (one try: it stops either way)."""
        try:
            self._client.call(wire.LEAVE, Message({"reason": reason}), timeout_s=self._call_timeout_s)
        except TransportError as exc:
            log.warning("party %s: could not tell the server it left: %s", self.party, exc.reason)

    def _call(self, method: str, message: Message) -> Message:
        """One call; after a transport failure or a server restart, the reply is the rejoin's."""
        try:
            reply = self._client.call(method, message, timeout_s=self._call_timeout_s)
        except TransportError as exc:
            return self._join(exc)
        self._bytes["sent"] += wire.message_bytes(message.tensors)
        self._bytes["received"] += wire.message_bytes(reply.tensors)
        if reply.meta.get("incarnation") != self._incarnation:
            log.warning("party %s: the parameter server restarted; joining again", self.party)
            return self._join(None)
        return reply

    def _join(self, error: TransportError | None) -> Message:
        """Join (again), retrying with backoff up to reconnect_timeout_s."""
        if error is not None:
            log.warning("party %s lost the parameter server (%s); joining again", self.party, error.reason)
        deadline = time.monotonic() + self._reconnect_timeout_s
        delay = 0.2
        request = Message({"protocol": wire.PROTOCOL, "evaluates": self._eval is not None})
        while True:
            try:
                reply = self._client.call(wire.JOIN, request, timeout_s=self._call_timeout_s)
                break
            except TransportError as exc:
                if time.monotonic() + delay > deadline:
                    raise ConnectFailed(
                        f"party {self.party}: no parameter server at {self._client.target} for "
                        f"{self._reconnect_timeout_s:g} s: {exc.reason}"
                    ) from exc
                log.info("party %s: parameter server unreachable (%s); retrying in %.1f s",
                         self.party, exc.reason, delay)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
        self._configure(reply.meta)
        if self._version >= 0:
            self._counts["rejoins"] += 1
        self._bytes["received"] += wire.message_bytes(reply.tensors)
        log.info("party %s joined %s at version %s", self.party, self._client.target, reply.meta.get("version"))
        return reply

    def _configure(self, meta: Mapping[str, Any]) -> None:
        if meta.get("protocol") != wire.PROTOCOL:
            raise UsageError(
                f"the parameter server speaks hfl protocol {meta.get('protocol')!r}, this worker {wire.PROTOCOL}"
            )
        self._layout.check_matches(meta.get("layout"))
        kind = meta.get("kind")
        if kind not in ("grad", "update"):
            raise UsageError(f"the parameter server names an unknown contribution kind {kind!r}")
        mu = meta.get("proximal_mu")
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu >= 0:
            raise UsageError(f"the parameter server sent proximal_mu {mu!r}")
        self._kind = kind
        self._total = wire.meta_int(meta, "total", minimum=1)
        self._eval_every = wire.meta_int(meta, "eval_every", minimum=1)
        self._proximal_mu = float(mu)
        self._incarnation = str(meta.get("incarnation"))

    def _apply_state(self, reply: Message) -> None:
        """Load a state reply (join, push or wait) into the model."""
        tensors = {name: _torch(value) for name, value in reply.tensors.items()}
        dense, ints = tensors.get(wire.DENSE), tensors.get(wire.INTS)
        self._layout.check_state_tensors(dense, ints)
        assert dense is not None and ints is not None
        self._layout.load_state(self._model, dense, ints)
        for name in self._layout.tables:
            table = self._model.get_parameter(name)
            full = tensors.get(f"table/{name}")
            if full is not None:
                if full.shape != table.shape or full.dtype != table.dtype:
                    raise UsageError(f"table {name!r} from the server is {full.dtype} {list(full.shape)}, "
                                     f"expected {table.dtype} {list(table.shape)}")
                with torch.no_grad():
                    table.copy_(full)
            self._apply_rows(name, tensors)
        self._version = wire.meta_int(reply.meta, "version")
        self._done = reply.meta.get("done") is True

    def _apply_rows(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        index = tensors.get(f"rows/{name}/index")
        if index is None:
            return
        values = tensors.get(f"rows/{name}/values")
        if values is None:
            raise UsageError(f"the server sent rows/{name}/index without values")
        rows = SparseRows(index, values, self._layout.tables[name][0])
        write_rows(self._model.get_parameter(name), rows)
        self._rows_received[name] += int(index.numel())

    # -- evaluation -------------------------------------------------------------------------

    def _maybe_evaluate(self) -> None:
        if self._eval is None:
            return
        key = self._version if self._done else (self._version // self._eval_every) * self._eval_every
        if key < 1 or key <= self._last_eval_key:
            return
        if self._layout.tables and self._rows_of is not None:
            self._pull_eval_rows()
        stats = evaluate(self._model, self._eval, batch_size=self._eval_batch_size)
        summary = {k: (v if np.isfinite(v) else None) for k, v in stats.summary().items()}
        record = {"event": "eval", "where": "worker", "party": self.party, "version": self._version, **summary}
        self.evaluations.append(record)
        self._emit(record)
        self._last_eval_key = key
        message = Message({"key": key}, stats.to_tensors())
        if self._done:
            # The server may already have stopped waiting for this report: one try only.
            try:
                self._client.call(wire.EVAL, message, timeout_s=self._call_timeout_s)
            except TransportError as exc:
                log.warning("party %s: final evaluation not delivered: %s", self.party, exc.reason)
            return
        reply = self._call(wire.EVAL, message)
        if reply.meta.get("status") == "joined":
            self._apply_state(reply)

    def _pull_eval_rows(self) -> None:
        assert self._eval is not None
        if self._eval_rows is None:
            self._eval_rows = self._rows_of_all(self._eval)
        reply = self._call(wire.WAIT, Message({"after": -1, "rows_only": True}, wire.want_tensors(self._eval_rows)))
        if reply.meta.get("status") == "joined":
            self._apply_state(reply)
            return
        tensors = {name: _torch(value) for name, value in reply.tensors.items()}
        for name in self._layout.tables:
            self._apply_rows(name, tensors)

    def _emit(self, record: dict[str, Any]) -> None:
        if self._on_metrics is not None:
            self._on_metrics(record)


def _torch(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
