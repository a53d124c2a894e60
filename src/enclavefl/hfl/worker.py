"""The horizontal-FL worker role: talks to the parameter server, a trainer does the learning.

The worker joins the parameter server (getting the global state, the model layout and
the strategy's kind), then loops until the server says the run is done, handing the
state to its trainer as numpy weights (name -> array):

* sgd strategies: `trainer.gradients(weights, config)` per step; the gradients are
  pushed with the table rows the trainer's *next* batch reads; the reply is the next
  global state with those rows.
* round strategies: `trainer.fit(weights, config)` per round; the new weights are pushed
  (embedding tables as the rows that changed) with the rows its training data reads.

`config` is what the strategy's `configure_round` sent for this version, plus `round`
(1-based) and `strategy`. Any object with `fit`/`evaluate` (and `gradients` for sgd
strategies) is a trainer (`enclavefl.train.Trainer`); `Worker.for_model` builds the
built-in one, a `TorchTrainer` with local SGD over (inputs..., labels) tensors.

Each push first waits for an upload place (`hfl.slot`), which bounds the server's memory.

Record-level differential privacy: `builtin_trainer(..., privacy=DpSgd)` (extra `[dp]`)
trains with DP-SGD, and before each round checks that the round's steps keep its
accountant within the policy's budget; a round that would not is not trained: the trainer
raises `StopTraining`, the worker stops (`stopped: privacy budget`) and sends nothing more.

Evaluation: a worker whose trainer evaluates (a TorchTrainer with an eval_loader, or any
other trainer) evaluates every global state the server asks for (every `eval_every`
versions and the last) and sends the statistics, never the rows.

Faults: a call that fails after the client's own retries (server restarted, network
gone) makes the worker join again with backoff for up to `reconnect_timeout_s`, then
continue from the server's current version; an interrupted contribution is simply lost.
A refusal by the server (attestation, policy, party not in the job) is raised at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from enclavefl.errors import Check, Rejected, TransportError, UsageError
from enclavefl.hfl import wire
from enclavefl.hfl.sparse import SparseRows
from enclavefl.hfl.strategies import GradContribution, UpdateContribution
from enclavefl.net.client import AttestedClient
from enclavefl.net.errors import ConnectFailed
from enclavefl.net.tensors import Message
from enclavefl.train.contract import FitResult, GradResult, Rows, StopTraining, Trainer
from enclavefl.train.losses import default_loss
from enclavefl.train.metrics import AUC_BINS, EvalStats, MetricFn, eval_stats
from enclavefl.train.optim import plain_sgd_factory
from enclavefl.train.tasks import TaskType
from enclavefl.train.torch import (
    LossFn,
    RowsOf,
    TensorBatches,
    TorchTrainer,
    as_tensors,
    embedding_rows,
    proximal_term,
    sgd_factory,
)
from enclavefl.validate import is_int, is_number

__all__ = ["Worker", "builtin_trainer", "embedding_rows", "evaluate"]

log = logging.getLogger("enclavefl.hfl")


def evaluate(
    model: nn.Module,
    data: Sequence[Any],
    *,
    batch_size: int = 1024,
    auc_bins: int | None = AUC_BINS,
    task: TaskType | None = None,
    user_metrics: Mapping[str, MetricFn] | None = None,
) -> EvalStats:
    """Evaluation statistics of `model` on (inputs..., labels), in eval mode, batch by batch.

    Used as the server's `evaluate` on its held-out rows. `task` None: binary or
    multi-class by the output width.
    """
    tensors = as_tensors("evaluation data", data)
    inputs, labels = tensors[:-1], tensors[-1]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.cat(
                [
                    model(*(t[start : start + batch_size].to(device) for t in inputs)).cpu()
                    for start in range(0, len(labels), batch_size)
                ]
            )
    finally:
        model.train(was_training)
    return eval_stats(logits, labels, task=task, auc_bins=auc_bins, user_metrics=user_metrics)


def builtin_trainer(
    model: nn.Module,
    train: Sequence[Any],
    *,
    batch_size: int,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    local_epochs: int = 1,
    eval_data: Sequence[Any] | None = None,
    loss_fn: LossFn | None = None,
    rows_of: RowsOf | None = None,
    seed: int = 0,
    shuffle: bool = True,
    eval_batch_size: int = 1024,
    device: str | torch.device = "cpu",
    privacy: Any = None,
    task: TaskType | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
) -> TorchTrainer:
    """The job file's worker: local SGD over (inputs..., labels) tensors, as a TorchTrainer.

    Batches are reshuffled every pass with seed + pass number; sgd strategies step on the
    server, so lr/momentum/weight_decay only drive local training in round strategies.
    With `privacy` (an `enclavefl.privacy.dpsgd.DpSgd` over the same model and rows) the
    rounds are DP-SGD (see the module docstring). `task` and `metrics` shape its
    evaluation statistics (see `TorchTrainer`).
    """
    if not is_int(eval_batch_size) or eval_batch_size < 1:
        raise UsageError(f"eval_batch_size must be an int >= 1, got {eval_batch_size!r}")
    cls = TorchTrainer if privacy is None else _PrivateTrainer
    trainer = cls(
        model,
        loss_fn or default_loss,
        # torch.optim.SGD's arithmetic without torch.optim, whose first optimizer imports
        # torch._dynamo (seconds, in every worker's first round); DP-SGD wraps a torch one.
        plain_sgd_factory(lr, momentum, weight_decay) if privacy is None else sgd_factory(lr, momentum, weight_decay),  # type: ignore[arg-type]
        TensorBatches(train, batch_size, shuffle=shuffle, seed=seed),
        TensorBatches(eval_data, eval_batch_size, shuffle=False) if eval_data is not None else None,
        device=device,
        local_epochs=local_epochs,
        rows_of=rows_of,
        task=task,
        metrics=metrics,
    )
    trainer.privacy = privacy  # type: ignore[attr-defined]
    return trainer


class _PrivateTrainer(TorchTrainer):
    """The built-in trainer with record-level DP-SGD: rounds only, within the privacy budget."""

    privacy: Any

    def train_one_round(self, config: Mapping[str, Any]) -> dict[str, float]:
        privacy = self.privacy
        epochs = int(config.get("local_epochs", self.local_epochs))
        if not privacy.fits(privacy.steps_per_epoch * epochs):
            raise StopTraining(
                "privacy budget",
                f"stopped: privacy budget (epsilon {privacy.epsilon:.3f} spent; another round would exceed "
                f"{privacy.max_epsilon:g})",
                privacy.report(),
            )
        model = self.model
        mu = float(config.get("mu", 0.0) or 0.0)
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # The proximal term depends on the parameters only, not on any record (no privacy cost).
        penalty = (lambda: proximal_term(model, anchor, mu)) if mu > 0 else None
        loss = privacy.train(self.optimizer_factory(model), epochs=epochs, loss_fn=self.loss, penalty=penalty)
        return {"loss": loss, **privacy.report()}

    def gradients(self, weights: Any, config: Any) -> GradResult:
        raise UsageError("record-level DP-SGD trains in rounds: use fedavg, fedprox or fedadam")


class Worker:
    """One worker of a horizontal-FL job, connected to the parameter server by `client`.

    `trainer` does the learning (see the module docstring). `evaluates`: whether this
    worker reports evaluations (default: a trainer with an `eval_loader` attribute
    evaluates when it is set; any other trainer evaluates). Local evaluations and
    training records go to `on_metrics`; `traffic` keeps the bytes and table rows of the
    last 1000 pushes.
    """

    def __init__(
        self,
        client: AttestedClient,
        trainer: Trainer,
        *,
        evaluates: bool | None = None,
        reconnect_timeout_s: float = 300.0,
        call_timeout_s: float = 600.0,
        on_metrics: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        missing = [name for name in ("fit", "evaluate") if not callable(getattr(trainer, name, None))]
        if missing:
            raise UsageError(f"a trainer needs fit() and evaluate(); {type(trainer).__name__} lacks {missing}")
        self.party = client.party
        self._client = client
        self.trainer = trainer
        self._evaluates = (getattr(trainer, "eval_loader", True) is not None) if evaluates is None else evaluates
        self._reconnect_timeout_s = reconnect_timeout_s
        self._call_timeout_s = call_timeout_s
        self._on_metrics = on_metrics
        self.stopped: str | None = None
        # What the server told us at join.
        self._layout: wire.Layout | None = None
        self._incarnation: str | None = None
        self._durable_seen = -1  # the newest version the server said it sealed
        self._kind = "grad"
        self._strategy = ""
        self._total = 0
        self._eval_every = 1
        self._config: dict[str, Any] = {}
        # The global state this worker holds: flat dense and ints vectors, whole tables.
        self._dense = np.empty(0, dtype=np.float32)
        self._ints = np.empty(0, dtype=np.int64)
        self._tables: dict[str, np.ndarray] = {}
        # Progress and accounting.
        self._version = -1
        self._done = False
        self._last_eval_key = 0
        self._eval_rows: dict[str, np.ndarray] | None = None
        self._counts = {"contributions": 0, "stale": 0, "rejoins": 0, "pushes": 0}
        self._bytes = {"sent": 0, "received": 0}
        self._rows_sent: dict[str, int] = {}
        self._rows_received: dict[str, int] = {}
        self.traffic: deque[dict[str, Any]] = deque(maxlen=1000)
        self.evaluations: list[dict[str, Any]] = []

    @classmethod
    def for_model(
        cls,
        client: AttestedClient,
        model: nn.Module,
        train: Sequence[Any],
        *,
        batch_size: int,
        eval_data: Sequence[Any] | None = None,
        reconnect_timeout_s: float = 300.0,
        call_timeout_s: float = 600.0,
        on_metrics: Callable[[dict[str, Any]], None] | None = None,
        **training: Any,
    ) -> Worker:
        """The built-in worker: `builtin_trainer(model, train, ...)` behind this role."""
        trainer = builtin_trainer(model, train, batch_size=batch_size, eval_data=eval_data, **training)
        return cls(client, trainer, reconnect_timeout_s=reconnect_timeout_s, call_timeout_s=call_timeout_s,
                   on_metrics=on_metrics)  # fmt: skip

    # -- public -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train until the server's run is done; returns this worker's summary."""
        self._apply_state(self._join(None))
        self._maybe_evaluate()
        if self._kind == "grad":
            if not callable(getattr(self.trainer, "gradients", None)):
                raise UsageError(
                    f"strategy {self._strategy} needs per-step gradients: {type(self.trainer).__name__} "
                    "has no gradients() (see enclavefl.train.GradientTrainer)"
                )
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
            **({"stopped": self.stopped} if self.stopped else {}),
            "bytes_sent": self._bytes["sent"],
            "bytes_received": self._bytes["received"],
            "rows_sent": dict(self._rows_sent),
            "rows_received": dict(self._rows_received),
            "evaluations": list(self.evaluations),
        }

    # -- training loops -------------------------------------------------------------------

    def _run_sgd(self) -> None:
        trainer: Any = self.trainer
        while not self._done:
            version, weights = self._version, self.weights()
            started = time.perf_counter()
            result = trainer.gradients(weights, self._round_config())
            compute_s = time.perf_counter() - started
            contribution = self._grad_contribution(weights, result, version)
            want = self._rows("next")
            self._push(contribution, want, compute_s, loss=result.metrics.get("loss"))
            log.debug("party %s: step at version %d, %.3f s", self.party, version, compute_s)
            self._maybe_evaluate()

    def _run_rounds(self) -> None:
        want = self._rows("train")
        while not self._done:
            version, weights = self._version, self.weights()
            started = time.perf_counter()
            try:
                result = self.trainer.fit(weights, self._round_config())
            except StopTraining as stop:
                self.stopped = stop.reason
                log.warning("party %s: %s", self.party, stop.message)
                self._emit({"event": "stopped", "party": self.party, "version": version, "reason": stop.reason,
                            **stop.report})  # fmt: skip
                self._leave(stop.reason)
                return
            compute_s = time.perf_counter() - started
            contribution = self._update_contribution(weights, result, version)
            del weights
            loss = result.metrics.get("loss")
            self._emit({**result.metrics, "event": "train", "party": self.party, "version": version, "loss": loss,
                        "compute_s": compute_s})  # fmt: skip
            log.info("party %s: round %d/%d trained in %.2f s%s", self.party, version + 1, self._total, compute_s,
                     f" (loss {loss:.4f})" if isinstance(loss, float) else "")  # fmt: skip
            self._push(contribution, want, compute_s, loss=loss)
            self._maybe_evaluate()

    def _round_config(self) -> dict[str, Any]:
        return {**self._config, "round": self._version + 1, "strategy": self._strategy}

    # -- weights at the trainer boundary --------------------------------------------------

    def weights(self) -> dict[str, np.ndarray]:
        """The global state this worker holds, name -> numpy array (views; do not modify)."""
        layout = self._require_layout()
        out: dict[str, np.ndarray] = {}
        for entry in (*layout.updates, *layout.frozen):
            out[entry.name] = self._dense[entry.offset : entry.end].reshape(entry.shape)
        for entry in layout.ints:
            out[entry.name] = self._ints[entry.offset : entry.end].reshape(entry.shape).astype(
                _numpy_dtype(layout.int_dtypes[entry.name])
            )
        out.update(self._tables)
        return out

    def _update_contribution(
        self, start: Mapping[str, np.ndarray], result: FitResult, version: int
    ) -> UpdateContribution:
        """New values of the dense entries (the server averages them exactly), deltas of the rest."""
        layout = self._require_layout()
        if not isinstance(result, FitResult):
            raise UsageError(f"trainer.fit must return a FitResult, got {type(result).__name__}")
        _check_examples("fit", result.num_examples)
        new = self._full_weights(start, result.weights, is_update=result.is_update)
        values: dict[str, torch.Tensor | SparseRows] = {}
        buffers: dict[str, torch.Tensor] = {}
        for entry in layout.updates:
            target = buffers if entry.name in layout.float_buffers else values
            target[entry.name] = torch.from_numpy(new[entry.name])
        for name, (num_rows, _dim) in layout.tables.items():
            delta = torch.from_numpy(new[name]) - torch.from_numpy(start[name])
            values[name] = SparseRows.from_dense(delta)
            assert values[name].num_rows == num_rows  # type: ignore[union-attr]
        for entry in layout.ints:
            buffers[entry.name] = torch.from_numpy(np.asarray(new[entry.name] - start[entry.name], dtype=np.int64))
        return UpdateContribution(self.party, int(result.num_examples), values, version, buffers)

    def _grad_contribution(self, start: Mapping[str, np.ndarray], result: GradResult, version: int) -> GradContribution:
        layout = self._require_layout()
        if not isinstance(result, GradResult):
            raise UsageError(f"trainer.gradients must return a GradResult, got {type(result).__name__}")
        _check_examples("gradients", result.num_examples)
        dtype = _numpy_dtype(layout.dtype)
        grads: dict[str, torch.Tensor | SparseRows] = {}
        trainable = {e.name: e.shape for e in layout.updates if e.name not in layout.float_buffers}
        for name, grad in result.gradients.items():
            if name in layout.tables:
                num_rows, dim = layout.tables[name]
                if isinstance(grad, Rows):
                    indices = np.asarray(grad.indices, dtype=np.int64).reshape(-1)
                    rows = np.asarray(grad.values, dtype=dtype).reshape(len(indices), dim)
                    grads[name] = SparseRows(torch.from_numpy(indices), torch.from_numpy(rows), num_rows)
                else:
                    grads[name] = SparseRows.from_dense(torch.from_numpy(_shaped(name, grad, (num_rows, dim), dtype)))
            elif name in trainable:
                if isinstance(grad, Rows):
                    raise UsageError(f"gradient of {name!r} came as Rows; only embedding tables may")
                grads[name] = torch.from_numpy(_shaped(name, grad, trainable[name], dtype))
            else:
                raise UsageError(f"the trainer returned a gradient for {name!r}, not a trainable parameter")
        buffers: dict[str, torch.Tensor] = {}
        for name, value in result.buffers.items():
            if name not in start or name in trainable or name in layout.tables:
                raise UsageError(f"the trainer returned buffer {name!r}, not a buffer of the model")
            delta = np.asarray(value) - start[name]
            buffers[name] = torch.from_numpy(np.ascontiguousarray(delta, dtype=start[name].dtype))
        return GradContribution(self.party, int(result.num_examples), grads, version, buffers)

    def _full_weights(
        self, start: Mapping[str, np.ndarray], returned: Mapping[str, np.ndarray], *, is_update: bool
    ) -> dict[str, np.ndarray]:
        """Every name of `start`, with the trainer's values (or start + its update) where it gave one."""
        unknown = sorted(set(returned) - set(start))
        if unknown:
            raise UsageError(f"the trainer returned weights for names the model does not have: {unknown[:5]}")
        out = dict(start)
        for name, value in returned.items():
            array = _shaped(name, value, start[name].shape, start[name].dtype)
            out[name] = start[name] + array if is_update else array
        return out

    def _rows(self, which: str) -> dict[str, np.ndarray]:
        """Table rows the trainer will read; all rows when it cannot tell."""
        layout = self._require_layout()
        if not layout.tables:
            return {}
        table_rows = getattr(self.trainer, "table_rows", None)
        if not callable(table_rows):
            return {name: np.arange(num_rows, dtype=np.int64) for name, (num_rows, _dim) in layout.tables.items()}
        found = table_rows(which)
        empty = np.empty(0, dtype=np.int64)
        return {name: np.asarray(found.get(name, empty), dtype=np.int64).reshape(-1) for name in layout.tables}

    def _require_layout(self) -> wire.Layout:
        if self._layout is None:
            raise UsageError("the worker has not joined the parameter server yet")
        return self._layout

    # -- talking to the server ------------------------------------------------------------

    def _push(
        self,
        contribution: GradContribution | UpdateContribution,
        want: Mapping[str, np.ndarray],
        compute_s: float,
        *,
        loss: Any = None,
    ) -> None:
        """Get an upload place, send the contribution, load the state the server answers with."""
        layout = self._require_layout()
        want_t = {name: torch.from_numpy(index) for name, index in want.items()}
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
                reply = self._call(wire.WAIT, Message({"after": -1}, wire.want_tensors(want_t)))
            self._apply_state(reply)
            return
        tensors = {**wire.want_tensors(want_t), **layout.pack_contribution(contribution)}
        meta = {"version": version, "weight": contribution.weight, "compute_s": compute_s, "lease": lease.meta["lease"]}
        if is_number(loss) and math.isfinite(loss):
            meta["loss"] = float(loss)  # the server's per-party training metrics
        sent = {name: int(tensors[f"index/{name}"].numel()) for name in layout.tables}
        self._counts["pushes"] += 1
        reply = self._call(wire.PUSH, Message(meta, tensors))
        record: dict[str, Any] = {"version": version, "bytes_sent": wire.message_bytes(tensors), "rows_sent": sent}
        del tensors
        received = wire.message_bytes(reply.tensors)
        while reply.meta.get("status") == "pending":
            reply = self._call(wire.WAIT, Message({"after": version}, wire.want_tensors(want_t)))
            received += wire.message_bytes(reply.tensors)
        status = reply.meta.get("status")
        if status == "ok":
            self._counts["contributions"] += 1
            for name, count in sent.items():
                self._rows_sent[name] = self._rows_sent.get(name, 0) + count
        elif status == "stale":
            self._counts["stale"] += 1
            log.info("party %s: contribution at version %d refused as stale; continuing at version %s",
                     self.party, version, reply.meta.get("version"))
        record["status"] = status
        record["bytes_received"] = received
        record["rows_received"] = {
            name: int(reply.tensors[f"rows/{name}/index"].shape[0]) if f"rows/{name}/index" in reply.tensors else 0
            for name in layout.tables
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
        request = Message({"protocol": wire.PROTOCOL, "evaluates": self._evaluates})
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
        layout = wire.Layout.from_description(meta.get("layout"))
        own = getattr(self.trainer, "get_weights", None)
        if callable(own):
            _check_weights_match(layout, own())
        kind = meta.get("kind")
        if kind not in ("grad", "update"):
            raise UsageError(f"the parameter server names an unknown contribution kind {kind!r}")
        self._layout = layout
        durable = wire.meta_int(meta, "durable", minimum=-1)
        version = wire.meta_int(meta, "version", minimum=0)
        if version < self._durable_seen:
            raise Rejected(
                f"party {self.party}: the parameter server came back at version {version}, but it had sealed a "
                f"checkpoint of version {self._durable_seen} before (this worker was told so): its newer checkpoints "
                "were deleted or rolled back; refusing to continue (peer-based rollback protection)",
                check=Check.FRESHNESS,
            )
        self._durable_seen = max(self._durable_seen, durable)
        self._kind = kind
        self._strategy = str(meta.get("strategy"))
        self._total = wire.meta_int(meta, "total", minimum=1)
        self._eval_every = wire.meta_int(meta, "eval_every", minimum=1)
        self._incarnation = str(meta.get("incarnation"))
        for name in layout.tables:
            self._rows_sent.setdefault(name, 0)
            self._rows_received.setdefault(name, 0)

    def _apply_state(self, reply: Message) -> None:
        """Load a state reply (join, push or wait) as this worker's global state."""
        layout = self._require_layout()
        tensors = {name: _torch(value) for name, value in reply.tensors.items()}
        dense, ints = tensors.get(wire.DENSE), tensors.get(wire.INTS)
        layout.check_state_tensors(dense, ints)
        assert dense is not None and ints is not None
        self._dense, self._ints = dense.numpy(), ints.numpy()
        for name, (num_rows, dim) in layout.tables.items():
            full = tensors.get(f"table/{name}")
            if full is not None:
                if tuple(full.shape) != (num_rows, dim) or full.dtype != layout.dtype:
                    raise UsageError(
                        f"table {name!r} from the server is {full.dtype} {list(full.shape)}, "
                        f"expected {layout.dtype} {[num_rows, dim]}"
                    )
                self._tables[name] = full.numpy().copy()
            elif name not in self._tables:
                raise UsageError(f"the server sent no table {name!r} at join")
            self._apply_rows(name, tensors)
        config = reply.meta.get("config")
        if config is not None:
            if not isinstance(config, dict):
                raise UsageError(f"the server sent a config that is not a mapping: {type(config).__name__}")
            self._config = dict(config)
        self._version = wire.meta_int(reply.meta, "version")
        self._done = reply.meta.get("done") is True
        durable = reply.meta.get("durable")
        if is_int(durable):
            self._durable_seen = max(self._durable_seen, durable)

    def _apply_rows(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        index = tensors.get(f"rows/{name}/index")
        if index is None:
            return
        values = tensors.get(f"rows/{name}/values")
        if values is None:
            raise UsageError(f"the server sent rows/{name}/index without values")
        layout = self._require_layout()
        rows = SparseRows(index, values, layout.tables[name][0])  # validates indices and shapes
        self._tables[name][rows.indices.numpy()] = rows.values.numpy()
        self._rows_received[name] += int(index.numel())

    # -- evaluation -------------------------------------------------------------------------

    def _maybe_evaluate(self) -> None:
        if not self._evaluates:
            return
        key = self._version if self._done else (self._version // self._eval_every) * self._eval_every
        if key < 1 or key <= self._last_eval_key:
            return
        layout = self._require_layout()
        if layout.tables:
            self._pull_eval_rows()
        result = self.trainer.evaluate(self.weights(), {**self._round_config(), "round": self._version})
        _check_examples("evaluate", result.num_examples)
        summary = {"examples": float(result.num_examples), **result.metrics}
        if "log_loss" not in summary:
            summary["loss"] = result.loss
        summary = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in summary.items()}  # type: ignore[misc]
        record = {"event": "eval", "where": "worker", "party": self.party, "version": self._version, **summary}
        self.evaluations.append(record)
        self._emit(record)
        self._last_eval_key = key
        if result.stats is not None:
            message = Message({"key": key}, {k: np.asarray(v) for k, v in result.stats.items()})
        else:
            message = Message({"key": key, "loss": float(result.loss), "examples": int(result.num_examples),
                               "metrics": {k: float(v) for k, v in result.metrics.items()}})  # fmt: skip
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
        if self._eval_rows is None:
            self._eval_rows = self._rows("eval")
        want = {name: torch.from_numpy(index) for name, index in self._eval_rows.items()}
        reply = self._call(wire.WAIT, Message({"after": -1, "rows_only": True}, wire.want_tensors(want)))
        if reply.meta.get("status") == "joined":
            self._apply_state(reply)
            return
        tensors = {name: _torch(value) for name, value in reply.tensors.items()}
        for name in self._require_layout().tables:
            self._apply_rows(name, tensors)

    def _emit(self, record: dict[str, Any]) -> None:
        if self._on_metrics is not None:
            self._on_metrics(record)


def _check_weights_match(layout: wire.Layout, weights: Mapping[str, Any]) -> None:
    """UsageError naming the first difference between the trainer's weights and the server's model."""
    expected = {e.name: tuple(e.shape) for e in (*layout.updates, *layout.frozen, *layout.ints)}
    expected.update(layout.tables)
    mine = {name: tuple(np.shape(value)) for name, value in weights.items()}
    for name, shape in expected.items():
        if name not in mine:
            raise UsageError(
                f"model differs from the server's: the server has {name} {list(shape)}, this model has not"
            )
        if mine[name] != shape:
            raise UsageError(
                f"model differs from the server's: {name} is {list(mine[name])}, the server has {list(shape)}"
            )
    extra = sorted(set(mine) - set(expected))
    if extra:
        raise UsageError(f"model differs from the server's: this model has {extra[:5]}, the server has not")


def _check_examples(what: str, count: Any) -> None:
    if not (is_int(count) or isinstance(count, np.integer)) or count < 1:
        raise UsageError(f"trainer.{what} must report num_examples as an int >= 1, got {count!r}")


def _shaped(name: str, value: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    array = np.asarray(value)
    if tuple(array.shape) != tuple(shape):
        raise UsageError(f"the trainer returned {name!r} with shape {list(array.shape)}, expected {list(shape)}")
    return np.ascontiguousarray(array, dtype=dtype)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError as exc:
        raise UsageError(f"hfl trainers exchange numpy weights, which cannot hold {dtype}") from exc


def _torch(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
