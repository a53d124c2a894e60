"""The leader: holds the labels, its own columns, the top model and the loss.

It serves the followers (it is the attested server): aligns samples with them, then per
iteration collects each follower's activations, computes the top model and the loss,
sends back the gradient of each follower's activations and steps its own optimizer.
Followers see only those gradients (never labels); the leader sees only activations
(never follower features). Every epoch ends with an evaluation on the aligned
validation rows, computed here.

The leader's model is any torch.nn.Module called as `model(x_own, follower_activations)`
(a list, in follower order) that returns outputs [N, 1] (binary logits, or a regression
prediction) or [N, C] (multi-class logits): `WideDeepLeader` as is, or `SplitMlpLeader`
around any top model (and the leader's own bottom). The loss is `loss_fn(outputs, labels)`
(default: by the task, else BCE on one column and cross-entropy on several); the metrics
are those of the task (`enclavefl.train.metrics.compute_metrics`) plus the user's.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from enclavefl.errors import FormatError, UsageError
from enclavefl.fsutil import atomic_write_bytes
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import Message
from enclavefl.privacy.label import keep_probability, randomized_response
from enclavefl.train.device import resolve_device
from enclavefl.train.losses import LossFn, default_loss, loss_function
from enclavefl.train.metrics import MetricFn, compute_metrics
from enclavefl.train.tasks import DEFAULT_LOSS, TaskType, better, primary_metric
from enclavefl.vfl.align import Ids
from enclavefl.vfl.align_channel import AlignmentEndpoint
from enclavefl.vfl.bridge import DEFAULT_POLL_S, LeaderBridge, Rewind
from enclavefl.vfl.errors import FollowerRefused, FollowerUnavailable
from enclavefl.vfl.plan import EVAL, PREDICT, TRAIN, Plan, Step
from enclavefl.vfl.state import OptimizerArg, PartyState, build_optimizer, snapshot
from enclavefl.vfl.storage import Aligned, Storage

__all__ = [
    "ACTIVATIONS",
    "GRADIENTS",
    "KEEP",
    "VERDICT",
    "LabelPrivacy",
    "Leader",
    "Predictions",
    "SplitMlpLeader",
    "as_tensor",
    "evaluate",
    "predict_as_leader",
    "task_loss",
]

log = logging.getLogger("enclavefl.vfl")

ACTIVATIONS, GRADIENTS = "act", "grad"
# keep_best: after each evaluation the leader tells every follower whether it was the best so far.
VERDICT = "verdict"
KEEP = ("last", "best")


class SplitMlpLeader(nn.Module):
    """The leader's half of a split model: its own bottom (optional) and the top model.

    The top is called with the list [own bottom's output, follower activations...] in
    follower order; any nn.Module that takes that list fits.
    """

    def __init__(self, top: nn.Module, bottom: nn.Module | None = None) -> None:
        super().__init__()
        self.top = top
        self.bottom = bottom

    def forward(self, x: torch.Tensor, follower_activations: Sequence[torch.Tensor]) -> torch.Tensor:
        own = [self.bottom(x)] if self.bottom is not None else []
        return self.top([*own, *follower_activations])


def as_tensor(values: Any, what: str) -> torch.Tensor:
    """Features as a torch tensor sharing memory with numpy input (float32 or int64)."""
    tensor = torch.as_tensor(values)
    if tensor.dim() != 2:
        raise UsageError(f"{what}: expected a 2-D array [rows, columns], got shape {list(tensor.shape)}")
    if tensor.dtype == torch.float64:
        tensor = tensor.float()
    elif not tensor.is_floating_point() and tensor.dtype != torch.int64:
        tensor = tensor.long()
    return tensor


def _gradient_of(activations: torch.Tensor) -> torch.Tensor:
    grad = activations.grad
    return torch.zeros_like(activations).cpu() if grad is None else grad.cpu()


def task_loss(task: TaskType | None, loss_fn: LossFn | None) -> LossFn:
    """`loss_fn`, else the task's default loss, else BCE on one column and cross-entropy on several."""
    if loss_fn is not None:
        return loss_fn
    return default_loss if task is None else loss_function(DEFAULT_LOSS[task], task)


def evaluate(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    task: TaskType | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
) -> dict[str, float]:
    """Classification: accuracy, log_loss, macro_f1 (and auc, binary); regression: mse, rmse, mae, r2;
    then each of the user's `metrics`."""
    if logits.dim() != 2:
        raise UsageError(f"the leader's model must return outputs [N, C], got shape {list(logits.shape)}")
    return compute_metrics(logits.cpu(), labels.cpu(), task=task, user_metrics=metrics)


class _Coordinator:
    """What training and prediction share on the leader: alignment, the bridge, rewinds."""

    _work_phase = "training"

    def __init__(
        self,
        server: AttestedServer,
        *,
        followers: Sequence[str],
        X: Any,  # noqa: N803 - the usual name for a feature matrix
        ids: Ids,
        model: nn.Module,
        optimizer: OptimizerArg,
        alignment: str,
        storage: Storage | None,
        resume: bool,
        join_timeout_s: float,
        step_timeout_s: float,
        alignment_workers: int | None,
        tee_join_order_key: bytes | None,
        poll_s: float,
        device: str | torch.device | None,
    ) -> None:
        # A leader may hold labels only: its model then reads the followers' activations alone.
        self._X = torch.zeros((len(ids), 0)) if X is None else as_tensor(X, "leader features X")
        if len(ids) != self._X.shape[0]:
            raise UsageError(f"leader: {len(ids)} ids for {self._X.shape[0]} feature rows")
        # The model and the batches live on the device; tensors go to the CPU only at the wire.
        self._device = resolve_device(device)
        model.to(self._device)
        built = build_optimizer(model, optimizer)
        self._server = server
        self._ids = ids
        self._model = model
        self._optimizer = built
        self._followers = tuple(followers)
        self._storage = storage
        self._resume = resume
        self._join_timeout_s = join_timeout_s
        self._step_timeout_s = step_timeout_s
        self._endpoint = AlignmentEndpoint(
            followers, alignment, workers=alignment_workers, order_key=tee_join_order_key, poll_s=poll_s
        )
        self._bridge = LeaderBridge(
            followers, restorable=self._stored_iterations, validate=self._validate, poll_s=poll_s
        )
        self._endpoint.register(server)
        self._bridge.register(server)
        self._party_state = PartyState("leader", model, built, storage)
        self._widths: dict[str, int] = {}
        self._position = -1
        self._aligned: Aligned | None = None
        self._plan: Plan | None = None
        self._completed: list[int] = []
        self._resumed_from = -1
        self._rewinds = 0
        self.on_phase: Callable[[str], None] | None = None
        self.prepare: Callable[[np.ndarray], dict[str, torch.Tensor]] | None = None
        """Training only: called with this party's training rows (indices into its X) once the
        plan is known; fits preprocessing (e.g. standardization) and returns the model state
        entries it set, which also become part of the initial state restored by rewinds."""
        """Called with `_work_phase` once the alignment is done."""

    # --- hooks ----------------------------------------------------------------------------------

    def _make_plan(self, rows: int) -> Plan:
        raise NotImplementedError

    def _iteration(self, step: Step) -> None:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any] | None) -> None:
        """Restore the subclass's bookkeeping (None: the initial state)."""

    # --- the run ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._run_unchecked()
        except FollowerUnavailable as exc:
            admitted = self._server.admitted()
            never = [p for p in exc.parties if p not in admitted]
            reason = exc.reason
            if never:
                reason += f"; never admitted (refused at admission, or unreachable): {never}"
            log.error("vertical FL stops: %s", reason)
            raise FollowerUnavailable(reason, parties=exc.parties) from exc
        except FollowerRefused as exc:
            log.error("vertical FL stops: %s", exc.reason)
            raise

    def _run_unchecked(self) -> None:
        storage = self._storage
        # The sealed alignment (from `enclavefl align` or an earlier run) is reused whenever every
        # party still holds it for the same ids; only checkpoints depend on resume.
        if storage is not None and self._resume:
            storage.check_fresh()  # before anything is deleted or restored
        if storage is not None and storage.rollback_protection == "peer-based":
            log.warning("checkpoints without a key broker: rollback protection is peer-based only (followers that "
                        "saw a newer checkpoint refuse an older resume; see docs/deploy.md)")
        stored = storage.load_alignment(self._ids) if storage is not None else None
        if storage is not None and not self._resume:
            storage.clear_checkpoints()
        aligned = self._endpoint.run(self._ids, stored=stored, timeout_s=self._join_timeout_s)
        if storage is not None and aligned is not stored:
            storage.clear_checkpoints()
            storage.save_alignment(aligned, self._ids)
        self._aligned = aligned
        if self.on_phase is not None:
            self.on_phase(self._work_phase)
        if aligned.size == 0:
            raise UsageError(f"{aligned.method}: the parties share no example ids: there is nothing to train on")
        plan = self._plan = self._make_plan(aligned.size)
        self._bridge.set_alignment(aligned.alignment_id)
        if self.prepare is not None and plan.mode == TRAIN:
            train, _ = plan.split()
            self._party_state.update_initial(self.prepare(np.sort(aligned.rows[train])))
        reports = self._bridge.wait_for_reports(self._join_timeout_s)
        common = set(self._stored_iterations()) | {self._position}
        for report in reports.values():
            common &= report.restorable
        resume = max(common)  # -1, the initial state, is always common
        self._restore(resume)
        self._resumed_from = resume
        self._bridge.establish(plan, resume)
        iteration = resume + 1
        while True:
            try:
                while iteration < plan.total:
                    self._iteration(plan.step(iteration))
                    self._completed.append(iteration)
                    iteration += 1
                self._bridge.close(self._step_timeout_s)
                return
            except Rewind as rewind:
                self._rewinds += 1
                self._restore(rewind.iteration)
                self._bridge.rewound(rewind.iteration)
                iteration = rewind.iteration + 1

    def _stored_iterations(self) -> list[int]:
        return self._party_state.stored()

    def _restore(self, iteration: int) -> None:
        if iteration != self._position:
            self._load_state(self._party_state.restore(iteration, plan=self._plan, aligned=self._aligned))
        if self._storage is not None:
            self._storage.clear_checkpoints(after=iteration)
            self._bridge.set_sealed(max(self._stored_iterations()))
        self._position = iteration

    @property
    def rollback_protection(self) -> str:
        """What stops a resume from older state than was sealed: "key-broker" (a version
        register the host cannot roll back), "peer-based" (only parties that saw a newer
        checkpoint refuse) or "none" (no checkpoints)."""
        return "none" if self._storage is None else self._storage.rollback_protection

    def _checkpoint(self, iteration: int) -> None:
        plan, aligned = self._plan, self._aligned
        assert plan is not None and aligned is not None
        if self._storage is None or not plan.is_checkpoint(iteration):
            return
        self._bridge.wait_committed(iteration, self._step_timeout_s)
        self._party_state.save(iteration, plan=plan, aligned=aligned, extra=self._state())
        self._bridge.set_sealed(iteration)

    # --- activations --------------------------------------------------------------------------

    def _validate(self, party: str, iteration: int, name: str, message: Message) -> None:
        plan = self._bridge.plan
        assert plan is not None  # the bridge accepts data only once established
        what = f"{name!r} of iteration {iteration} from {party}"
        if name != ACTIVATIONS or set(message.tensors) != {ACTIVATIONS}:
            raise FormatError(f"{what}: expected one tensor {ACTIVATIONS!r}, got {sorted(message.tensors)}")
        act = message.tensors[ACTIVATIONS]
        if not isinstance(act, torch.Tensor) or act.dtype != torch.float32 or act.dim() != 2:
            got = f"{getattr(act, 'dtype', type(act).__name__)} {list(getattr(act, 'shape', []))}"
            raise FormatError(f"{what}: expected a float32 torch tensor [rows, width], got {got}")
        rows = plan.step(iteration).positions.size
        width = self._widths.setdefault(party, int(act.shape[1]))
        if tuple(act.shape) != (rows, width):
            raise FormatError(f"{what}: expected shape [{rows}, {width}], got {list(act.shape)}")
        if not bool(torch.isfinite(act).all()):
            raise FormatError(f"{what}: activations hold NaN or infinite values (did the follower diverge?)")

    def _activations(self, iteration: int, *, grad: bool) -> list[torch.Tensor]:
        messages = self._bridge.collect(iteration, ACTIVATIONS, self._step_timeout_s)
        return [messages[f].tensors[ACTIVATIONS].to(self._device).requires_grad_(grad) for f in self._followers]

    def _rows(self, step: Step) -> torch.Tensor:
        assert self._aligned is not None
        return torch.from_numpy(self._aligned.rows[step.positions])

    def _features(self, rows: torch.Tensor) -> torch.Tensor:
        return self._X[rows].to(self._device)


@dataclass(frozen=True)
class LabelPrivacy:
    """Label DP by randomized response with `epsilon` over `num_classes` classes.

    `seed_hex` (secret: from the OS, sealed in checkpoints, never logged) draws the
    randomization once; the same seed gives the same randomized labels after a resume.
    """

    epsilon: float
    num_classes: int
    seed_hex: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)

    def with_seed(self, seed_hex: str) -> LabelPrivacy:
        return LabelPrivacy(self.epsilon, self.num_classes, seed_hex)

    def randomize(self, labels: torch.Tensor) -> torch.Tensor:
        rng = np.random.default_rng(int(self.seed_hex, 16))
        noisy = randomized_response(labels.cpu().numpy(), self.epsilon, num_classes=self.num_classes, rng=rng)
        return torch.from_numpy(noisy).to(labels.device)

    def report(self) -> dict[str, Any]:
        return {
            "label_epsilon": self.epsilon,
            "label_delta": 0.0,
            "label_mechanism": "randomized-response",
            "label_keep_probability": keep_probability(self.epsilon, self.num_classes),
        }


class Leader(_Coordinator):
    """The leader of a vertical FL training job. Build it, start the server, then `run()`.

    `followers` are the follower party names (in the order the top model sees their
    activations). `X`, `y`, `ids`: the leader's own features (None if it holds labels
    only), labels and example ids.
    `storage` (optional) seals the alignment and checkpoints every
    `storage.checkpoint_every` iterations; with `resume=True` a restarted leader goes on
    from the last checkpoint every party holds. `on_metrics` gets each epoch's record.
    Followers must join within `join_timeout_s` and answer each step within
    `step_timeout_s`, else FollowerUnavailable. The aligned rows are in their canonical order
    (by a hash of the id, `enclavefl.vfl.align.canonical_order`), so the validation rows and
    the batches depend only on `seed` and the ids, not on the alignment's random values.
    `tee_join_order_key` (32 bytes) fixes the order the TEE join returns before that.

    `model` is any nn.Module called as model(x_own, follower_activations); `optimizer` an
    optimizer over its parameters or a factory `fn(model) -> optimizer` (called once the
    model is on `device`). `task` (binary, multiclass, regression; None: by the output
    width) picks the default loss and the metrics; `loss_fn(outputs, labels)` (a mean
    over the batch) replaces the loss, and `metrics` (name -> fn(outputs, labels) -> float)
    adds metrics to every evaluation. `device`: auto, cpu, cuda or cuda:N.

    `keep`: "last" (default) or "best": every party ends `run()` with its weights of the
    evaluation with the best `best_by` (a metric of the evaluations, direction-aware: the
    highest auc/accuracy/macro_f1/r2, the lowest log_loss/rmse/mae/mse; default: auc, else
    accuracy, else r2, macro_f1, rmse, mae, log_loss), so what is exported is that epoch's
    model. The leader judges each evaluation and tells the followers, which snapshot their
    half then; the snapshots are part of every checkpoint.
    """

    def __init__(
        self,
        server: AttestedServer,
        *,
        followers: Sequence[str],
        X: Any,  # noqa: N803
        y: Any,
        ids: Ids,
        model: nn.Module,
        optimizer: OptimizerArg,
        epochs: int,
        batch_size: int,
        alignment: str = "ecdh-psi",
        seed: int = 0,
        validation_fraction: float = 0.2,
        pipeline_depth: int = 1,
        storage: Storage | None = None,
        resume: bool = False,
        on_metrics: Callable[[dict[str, Any]], None] | None = None,
        join_timeout_s: float = 60.0,
        step_timeout_s: float = 300.0,
        alignment_workers: int | None = None,
        tee_join_order_key: bytes | None = None,
        poll_s: float = DEFAULT_POLL_S,
        label_privacy: LabelPrivacy | None = None,
        task: TaskType | None = None,
        loss_fn: LossFn | None = None,
        metrics: Mapping[str, MetricFn] | None = None,
        device: str | torch.device | None = "cpu",
        keep: str = "last",
        best_by: str | None = None,
    ) -> None:
        if keep not in KEEP:
            raise UsageError(f"keep must be one of {list(KEEP)}, got {keep!r}")
        if best_by is not None and keep != "best":
            raise UsageError("best_by is only used with keep='best'")
        if best_by is not None:
            better(best_by, 0.0, None)  # refuses a metric whose direction is unknown
        super().__init__(
            server, followers=followers, X=X, ids=ids, model=model, optimizer=optimizer, alignment=alignment,
            storage=storage, resume=resume, join_timeout_s=join_timeout_s, step_timeout_s=step_timeout_s,
            alignment_workers=alignment_workers, tee_join_order_key=tee_join_order_key, poll_s=poll_s,
            device=device,
        )  # fmt: skip
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.shape[0] != self._X.shape[0]:
            raise UsageError(f"leader: labels must be [rows] for {self._X.shape[0]} rows, got {list(y.shape)}")
        self._y = y.to(self._device)
        self._task = task
        self._loss_fn = task_loss(task, loss_fn)
        self._metrics = dict(metrics or {})
        self._settings = (batch_size, epochs, seed, validation_fraction, pipeline_depth)
        self._label_privacy = label_privacy
        # Training reads these labels only; validation keeps the true ones (never trained on).
        self._train_y = label_privacy.randomize(self._y) if label_privacy is not None else self._y
        self._on_metrics = on_metrics
        self._history: list[dict[str, Any]] = []
        self._loss_sum = 0.0
        self._loss_count = 0
        self._epoch_started = time.monotonic()
        self._timed_samples = 0
        self._traffic: dict[str, list[int]] = {f: [0, 0] for f in self._followers}
        self._compute_s = 0.0
        self._name = server.party
        self._keep_best = keep == "best"
        self._best_by = best_by
        self._best: dict[str, Any] | None = None  # keep_best: the best evaluation so far and its weights

    def _make_plan(self, rows: int) -> Plan:
        batch_size, epochs, seed, validation_fraction, pipeline_depth = self._settings
        every = self._storage.checkpoint_every if self._storage is not None else 0
        return Plan(TRAIN, rows, batch_size, epochs, seed, validation_fraction, pipeline_depth, every,
                    keep_best=self._keep_best)

    def run(self) -> dict[str, Any]:
        """Align, train, evaluate every epoch; returns the summary (history of epoch records)."""
        started = time.monotonic()
        self._run()
        plan, aligned = self._plan, self._aligned
        assert plan is not None and aligned is not None
        kept = self._keep()
        return {
            "role": "leader",
            "alignment": aligned.method,
            "intersection": aligned.size,
            "train_rows": aligned.size - plan.validation_rows,
            "validation_rows": plan.validation_rows,
            "iterations": plan.total,
            "resumed_from": self._resumed_from,
            "rollback_protection": self.rollback_protection,
            "rewinds": self._rewinds,
            "completed": list(self._completed),
            "history": list(self._history),
            "final": dict(self._history[-1]) if self._history else {},
            "kept": kept,
            **({"privacy": self._label_privacy.report()} if self._label_privacy is not None else {}),
            "wall_s": time.monotonic() - started,
        }

    def _keep(self) -> dict[str, Any]:
        """Load the kept evaluation's weights (keep_best) and say which epoch the model is from."""
        plan = self._plan
        assert plan is not None
        if not self._keep_best:
            return {"keep": "last", "epoch": plan.epochs, "iteration": plan.total - 1}
        best = self._best
        if best is None:  # no evaluation had a finite value of the metric
            raise UsageError(f"keep='best': no evaluation gave a finite {self._best_by or 'metric'}")
        self._model.load_state_dict(best["model"])
        log.info("keeping the weights of epoch %d (best %s %.4f)", best["epoch"], best["metric"], best["value"])
        return {"keep": "best", **{k: best[k] for k in ("epoch", "iteration", "metric", "value")}}

    def validation_ids(self) -> np.ndarray:
        """The leader's ids of the validation rows (after `run()`), in its own input order."""
        assert self._plan is not None and self._aligned is not None
        _, validation = self._plan.split()
        return np.asarray(self._ids)[np.sort(self._aligned.rows[validation])]

    def split_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(training ids, validation ids) of the last run, as the leader's own ids: the split
        is seeded by `seed` over the aligned order, so a centralized baseline can use the same."""
        plan, aligned = self._plan, self._aligned
        if plan is None or aligned is None:
            raise UsageError("split_ids: the leader has not aligned yet (call run() first)")
        ids = np.asarray(self._ids)
        train, validation = plan.split()
        return ids[aligned.rows[train]], ids[aligned.rows[validation]]

    def _iteration(self, step: Step) -> None:
        self._bridge.open(step.iteration, self._step_timeout_s)
        if step.kind == EVAL:
            self._evaluate(step)
        else:
            self._train(step)
        self._checkpoint(step.iteration)

    def _train(self, step: Step) -> None:
        if self._loss_count == 0:  # the epoch's first batch: its throughput is counted from here
            self._epoch_started, self._timed_samples = time.monotonic(), 0
            self._traffic = {f: [0, 0] for f in self._followers}
            self._compute_s = 0.0
        activations = self._activations(step.iteration, grad=True)
        computing = time.perf_counter()
        rows = self._rows(step)
        self._model.train()
        loss = self._loss_fn(self._model(self._features(rows), activations), self._train_y[rows.to(self._device)])
        assert self._optimizer is not None
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Followers start their backward pass while the leader steps.
        pairs = zip(self._followers, activations, strict=False)
        # An activation the top model ignores has no gradient: zero, as autograd would give it.
        gradients = {f: Message(tensors={GRADIENTS: _gradient_of(a)}) for f, a in pairs}
        self._compute_s += time.perf_counter() - computing
        for follower, a in zip(self._followers, activations, strict=False):  # (activations in, gradients out)
            self._traffic[follower][0] += a.nbytes
            self._traffic[follower][1] += a.grad.nbytes if a.grad is not None else 0
        self._bridge.post(step.iteration, GRADIENTS, gradients)
        self._optimizer.step()
        self._bridge.finish(step.iteration)
        self._position = step.iteration
        self._loss_sum += float(loss.detach()) * rows.numel()
        self._loss_count += rows.numel()
        self._timed_samples += rows.numel()

    def _evaluate(self, step: Step) -> None:
        activations = self._activations(step.iteration, grad=False)
        rows = self._rows(step)
        self._model.eval()
        with torch.no_grad():
            logits = self._model(self._features(rows), activations)
        self._model.train()
        metrics = evaluate(logits, self._y[rows.to(self._device)], task=self._task, metrics=self._metrics)
        plan = self._plan
        assert plan is not None
        if plan.keep_best:
            improved = self._judge(step, metrics)
            self._bridge.post(step.iteration, VERDICT,
                              {f: Message(meta={"best": improved}) for f in self._followers})  # fmt: skip
        self._bridge.finish(step.iteration)
        self._position = step.iteration
        now = time.monotonic()
        record: dict[str, Any] = {
            "epoch": step.epoch + 1,
            "iteration": step.iteration,
            "train_loss": self._loss_sum / self._loss_count if self._loss_count else math.nan,
            **{f"val_{name}": value for name, value in metrics.items()},
            "validation_rows": int(rows.numel()),
            "samples_per_s": self._timed_samples / max(now - self._epoch_started, 1e-9),
            **(self._label_privacy.report() if self._label_privacy is not None else {}),
            # Each party's own figures this epoch (the followers' traffic as the leader counts it).
            "parties": {
                self._name: {"loss": self._loss_sum / self._loss_count if self._loss_count else math.nan,
                             "examples": self._loss_count, "compute_s": self._compute_s,
                             "bytes_sent": sum(t[1] for t in self._traffic.values()),
                             "bytes_received": sum(t[0] for t in self._traffic.values())},
                **{f: {"examples": self._loss_count, "bytes_sent": sent, "bytes_received": received}
                   for f, (sent, received) in self._traffic.items()},
            },
        }
        self._history.append(record)
        self._loss_sum, self._loss_count = 0.0, 0
        scores = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        log.info(
            "epoch %d/%d: train loss %.4f, validation %s (%d rows), %.0f samples/s",
            record["epoch"], plan.epochs, record["train_loss"], scores, record["validation_rows"],
            record["samples_per_s"],
        )  # fmt: skip
        if self._on_metrics is not None:
            self._on_metrics(dict(record))

    def _judge(self, step: Step, metrics: dict[str, float]) -> bool:
        """Whether this evaluation beats the best so far (then its weights are kept in memory)."""
        metric = self._best_by or primary_metric(list(metrics))
        if metric is None or metric not in metrics:
            raise UsageError(f"keep='best' by {metric!r}: the evaluations give {sorted(metrics)}")
        value = float(metrics[metric])
        if not better(metric, value, None if self._best is None else self._best["value"]):
            return False
        self._best = {"epoch": step.epoch + 1, "iteration": step.iteration, "metric": metric, "value": value,
                      "model": snapshot(self._model, None)["model"]}  # fmt: skip
        self._bridge.set_kept(step.iteration)
        return True

    def _state(self) -> dict[str, Any]:
        state = {"history": list(self._history), "loss_sum": self._loss_sum, "loss_count": self._loss_count}
        if self._best is not None:
            state["best"] = self._best
        if self._label_privacy is not None:
            # Sealed with the checkpoint: a resumed leader must train on the same randomized
            # labels (fresh ones would be a second release of the labels, doubling epsilon).
            state["label_rr_seed"] = self._label_privacy.seed_hex
        return state

    def _load_state(self, state: dict[str, Any] | None) -> None:
        best = None if state is None else state.get("best")
        if best is not None and not (isinstance(best, dict) and isinstance(best.get("model"), dict)
                                     and isinstance(best.get("iteration"), int)):
            raise FormatError("leader checkpoint: its best evaluation is not a record with weights")
        self._best = best
        self._bridge.set_kept(-1 if best is None else best["iteration"])
        if state is None:
            self._history, self._loss_sum, self._loss_count = [], 0.0, 0
            return
        if self._label_privacy is not None:
            seed = state.get("label_rr_seed")
            if not isinstance(seed, str):
                raise FormatError("leader checkpoint: written without label privacy, this job uses it")
            self._label_privacy = self._label_privacy.with_seed(seed)
            self._train_y = self._label_privacy.randomize(self._y)
        history, loss_sum, loss_count = state.get("history"), state.get("loss_sum"), state.get("loss_count")
        if not isinstance(history, list) or not isinstance(loss_sum, float) or not isinstance(loss_count, int):
            raise FormatError("leader checkpoint: history, loss_sum or loss_count missing or of the wrong type")
        self._history, self._loss_sum, self._loss_count = list(history), loss_sum, loss_count
        self._epoch_started, self._timed_samples = time.monotonic(), 0  # a resumed epoch: from here


@dataclass(frozen=True, eq=False)
class Predictions:
    """The leader's predictions for the rows every party holds, in the leader's input order.

    `logits` are the model's outputs [N, C]: for a regression task, the predictions [N, 1].
    """

    ids: np.ndarray
    logits: np.ndarray
    task: TaskType | None = None

    def probabilities(self) -> np.ndarray:
        """P(y=1) [N] for binary models, class probabilities [N, C] otherwise."""
        if self.task == "regression":
            raise UsageError("a regression model predicts values, not probabilities")
        logits = torch.from_numpy(self.logits)
        if logits.shape[1] == 1:
            return torch.sigmoid(logits[:, 0]).numpy()
        return torch.softmax(logits, dim=1).numpy()

    def to_csv(self) -> bytes:
        """id,probability (binary), id,prediction,p0..pC-1 (multi-class) or id,prediction (regression)."""
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        if self.task == "regression":
            writer.writerow(["id", "prediction"])
            rows = zip(self.ids.tolist(), self.logits[:, 0], strict=True)
            writer.writerows((str(i), repr(float(p))) for i, p in rows)
            return text.getvalue().encode("utf-8")
        probabilities = self.probabilities()
        if probabilities.ndim == 1:
            writer.writerow(["id", "probability"])
            writer.writerows((str(i), repr(float(p))) for i, p in zip(self.ids.tolist(), probabilities, strict=False))
        else:
            writer.writerow(["id", "prediction", *(f"p{c}" for c in range(probabilities.shape[1]))])
            for i, row in zip(self.ids.tolist(), probabilities, strict=False):
                writer.writerow([str(i), int(row.argmax()), *(repr(float(p)) for p in row)])
        return text.getvalue().encode("utf-8")


class _Predictor(_Coordinator):
    _work_phase = "predicting"

    def __init__(
        self, server: AttestedServer, *, batch_size: int, pipeline_depth: int, task: TaskType | None, **kwargs: Any
    ) -> None:
        super().__init__(server, optimizer=None, storage=None, resume=False, tee_join_order_key=None, **kwargs)
        self._task = task
        self._batch_size = batch_size
        self._pipeline_depth = pipeline_depth
        self._logits: np.ndarray | None = None

    def _make_plan(self, rows: int) -> Plan:
        return Plan(PREDICT, rows, self._batch_size, pipeline_depth=self._pipeline_depth)

    def _iteration(self, step: Step) -> None:
        self._bridge.open(step.iteration, self._step_timeout_s)
        activations = self._activations(step.iteration, grad=False)
        self._model.eval()
        with torch.no_grad():
            logits = self._model(self._features(self._rows(step)), activations).cpu().numpy()
        if self._logits is None:
            assert self._plan is not None
            self._logits = np.zeros((self._plan.rows, logits.shape[1]), dtype=np.float32)
        self._logits[step.positions] = logits
        self._bridge.finish(step.iteration)
        self._position = step.iteration

    def predict(self) -> Predictions:
        self._run()
        assert self._aligned is not None and self._logits is not None
        # The leader's input order (the common order is by a hash of the id, and a user joins
        # predictions back to their rows).
        order = np.argsort(self._aligned.rows, kind="stable")
        return Predictions(np.asarray(self._ids)[self._aligned.rows[order]], self._logits[order], self._task)


def predict_as_leader(
    server: AttestedServer,
    *,
    followers: Sequence[str],
    X: Any,  # noqa: N803
    ids: Ids,
    model: nn.Module,
    alignment: str = "ecdh-psi",
    batch_size: int = 1024,
    pipeline_depth: int = 1,
    out_path: str | Path | None = None,
    join_timeout_s: float = 60.0,
    step_timeout_s: float = 300.0,
    alignment_workers: int | None = None,
    poll_s: float = DEFAULT_POLL_S,
    on_phase: Callable[[str], None] | None = None,
    task: TaskType | None = None,
    device: str | torch.device | None = "cpu",
) -> Predictions:
    """Joint prediction through the bridge on the rows every party holds (aligned by id).

    Registers on `server` (start it before or after calling; it must be running while this
    waits for the followers). Writes `out_path` as CSV when given.
    """
    predictor = _Predictor(
        server, followers=followers, X=X, ids=ids, model=model, alignment=alignment, batch_size=batch_size,
        pipeline_depth=pipeline_depth, join_timeout_s=join_timeout_s, step_timeout_s=step_timeout_s,
        alignment_workers=alignment_workers, poll_s=poll_s, task=task, device=device,
    )  # fmt: skip
    predictor.on_phase = on_phase
    predictions = predictor.predict()
    if out_path is not None:
        atomic_write_bytes(Path(out_path), predictions.to_csv())
        log.info("wrote %d predictions to %s", predictions.ids.size, out_path)
    return predictions
