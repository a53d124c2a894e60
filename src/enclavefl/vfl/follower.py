"""A follower: holds other columns of the same samples and a bottom model over them.

It dials the leader (an attested client), aligns samples, joins the bridge, then per
iteration sends its bottom model's activations for the iteration's batch and applies the
gradient the leader returns for them. It never sees labels; its features never leave it.

The follower keeps the graph of its last forward pass, so with `pipeline_depth` 1 the
backward pass reuses it. When its parameters changed since that forward (pipelining) or
the graph is gone (a rejoin after a lost connection or a restart), it recomputes the
activations of that batch and backpropagates the leader's gradient through them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from enclavefl.errors import FormatError, Rejected, UsageError
from enclavefl.net.client import AttestedClient
from enclavefl.net.tensors import Message
from enclavefl.vfl.align import Ids
from enclavefl.vfl.align_channel import check_method, follow_alignment
from enclavefl.vfl.bridge import DEFAULT_POLL_S, JOIN, RECV, SEND, START, FollowerBridge, SessionLost, meta_int
from enclavefl.train.device import resolve_device
from enclavefl.vfl.leader import ACTIVATIONS, GRADIENTS, VERDICT, as_tensor
from enclavefl.vfl.plan import EVAL, TRAIN, Plan, Step
from enclavefl.vfl.state import OptimizerArg, PartyState, build_optimizer, snapshot
from enclavefl.vfl.storage import Aligned, Storage

log = logging.getLogger("enclavefl.vfl")

__all__ = ["Follower", "predict_as_follower"]


class Follower:
    """A follower of a vertical FL job. Build it, then `run()` (training or prediction,
    as the leader's plan says; `optimizer` may be None for prediction only).

    `storage` (optional) seals the alignment and the checkpoints the plan names; with
    `resume=True` a restarted follower rejoins from them. Lost connections are retried
    for `reconnect_timeout_s`, then LeaderUnreachable.

    `model` is any nn.Module over this party's features (its outputs are the activations
    sent to the leader); `optimizer` an optimizer over its parameters or a factory
    `fn(model) -> optimizer`. `device`: auto, cpu, cuda or cuda:N (activations and
    gradients cross the wire from the CPU).

    When the leader's plan keeps the best evaluation (`Leader(keep="best")`), the leader
    tells this follower after each evaluation whether it was the best so far; the follower
    then snapshots its half, seals the snapshot with its checkpoints and ends `run()` with
    those weights, so that it exports the same epoch as the leader.
    """

    def __init__(
        self,
        client: AttestedClient,
        *,
        X: Any,  # noqa: N803 - the usual name for a feature matrix
        ids: Ids,
        model: nn.Module,
        optimizer: OptimizerArg = None,
        alignment: str = "ecdh-psi",
        storage: Storage | None = None,
        resume: bool = False,
        eval_batch_size: int = 4096,
        reconnect_timeout_s: float = 120.0,
        alignment_workers: int | None = None,
        poll_s: float = DEFAULT_POLL_S,
        device: str | torch.device | None = "cpu",
    ) -> None:
        self._X = as_tensor(X, "follower features X")
        if len(ids) != self._X.shape[0]:
            raise UsageError(f"follower: {len(ids)} ids for {self._X.shape[0]} feature rows")
        if eval_batch_size < 1:
            raise UsageError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self._device = resolve_device(device)
        model.to(self._device)
        built = build_optimizer(model, optimizer)
        self._ids = ids
        self._model = model
        self._optimizer = built
        self._method = check_method(alignment)
        self._storage = storage
        self._resume = resume
        self._eval_batch_size = eval_batch_size
        self._alignment_workers = alignment_workers
        self._bridge = FollowerBridge(client, reconnect_timeout_s=reconnect_timeout_s, poll_s=poll_s)
        self.party = client.party
        self._party_state = PartyState(self.party, model, built, storage)
        self._position = -1
        self._aligned: Aligned | None = None
        self._plan: Plan | None = None
        self._instance = ""
        self._pending: deque[int] = deque()
        self._graph: tuple[int, int, torch.Tensor] | None = None  # (iteration, optimizer steps, activations)
        self._replies: dict[int, torch.Tensor] = {}
        self._verdicts: dict[int, bool] = {}  # keep_best: evaluation iteration -> the leader's verdict
        self._best: dict[str, Any] | None = None  # keep_best: {"iteration", "model"} of the best evaluation
        self._steps = 0
        self._applied: list[int] = []
        self._resumed_from: int | None = None
        self._rejoins = 0
        self.prepare: Callable[[np.ndarray], dict[str, torch.Tensor]] | None = None
        """Training only: called with this party's training rows (indices into its X) once the
        leader's plan is known; fits preprocessing and returns the model state entries it set."""
        self._leader_sealed = -1  # the newest checkpoint the leader said it sealed

    def run(self) -> dict[str, Any]:
        """Align, then follow the leader's plan until it says done; returns a summary."""
        started = time.monotonic()
        storage = self._storage
        # The sealed alignment (from `enclavefl align` or an earlier run) is reused whenever every
        # party still holds it for the same ids; only checkpoints depend on resume.
        if storage is not None and self._resume:
            storage.check_fresh()  # before anything is deleted or restored
        stored = storage.load_alignment(self._ids) if storage is not None else None
        if storage is not None and not self._resume:
            storage.clear_checkpoints()
        while True:
            aligned = follow_alignment(
                self._bridge, self._method, self._ids, stored=stored, workers=self._alignment_workers
            )
            if aligned is not stored:
                if storage is not None:
                    storage.clear_checkpoints()
                    storage.save_alignment(aligned, self._ids)
                stored = aligned
            if self._aligned is not None and self._aligned.alignment_id != aligned.alignment_id:
                self._restore(-1)  # the live state belongs to the old alignment's order
            self._aligned = aligned
            try:
                self._follow()
                break
            except SessionLost as lost:
                log.info("%s: the leader restarted (instance %s): aligning again", self.party, lost.instance)
                self._rejoins += 1
        plan = self._plan
        assert plan is not None
        kept = self._keep(plan)
        return {
            "role": "follower",
            "party": self.party,
            "alignment": aligned.method,
            "intersection": aligned.size,
            "iterations": plan.total,
            "resumed_from": self._resumed_from,
            "rollback_protection": "none" if storage is None else storage.rollback_protection,
            "rejoins": self._rejoins,
            "applied": list(self._applied),
            "kept": kept,
            "wall_s": time.monotonic() - started,
        }

    def _keep(self, plan: Plan) -> dict[str, Any]:
        """Load the best evaluation's weights when the plan keeps the best; which iteration the model is from."""
        if not plan.keep_best:
            return {"keep": "last", "iteration": plan.total - 1}
        if self._best is None:
            raise FormatError(f"{self.party}: the plan keeps the best evaluation, but the leader named none")
        self._model.load_state_dict(self._best["model"])
        log.info("%s: keeping the weights of iteration %d (the leader's best evaluation)",
                 self.party, self._best["iteration"])  # fmt: skip
        return {"keep": "best", "iteration": self._best["iteration"]}

    # --- session ------------------------------------------------------------------------------

    def _follow(self) -> None:
        """Join and iterate; rejoin (same leader) when the federation rewinds."""
        while True:
            resume = self._join()
            try:
                self._iterate(resume)
                return
            except SessionLost as lost:
                if lost.instance != self._instance:
                    raise
                log.info("%s: rejoining the leader (the federation goes back to a checkpoint)", self.party)
                self._rejoins += 1

    def _restorable(self) -> list[int]:
        return sorted({self._position, *self._party_state.stored()})

    def _join(self) -> int:
        aligned = self._aligned
        assert aligned is not None
        restorable = self._restorable()
        while True:
            answer = self._bridge.call_raw(
                JOIN, Message(meta={"alignment": aligned.alignment_id, "restorable": restorable})
            )
            if answer.meta.get("status") == "ready":
                break
            if answer.meta.get("status") != "wait":
                raise FormatError(f"join: unexpected answer {answer.meta}")
        session = answer.meta.get("session")
        if not isinstance(session, str) or ":" not in session:
            raise FormatError(f"join: session must be 'instance:generation', got {session!r}")
        plan = Plan.from_meta(answer.meta.get("plan"))
        resume = meta_int(answer.meta, "resume", "join answer")
        if plan.rows != aligned.size:
            raise FormatError(f"join: the leader's plan has {plan.rows} aligned rows, this party {aligned.size}")
        if resume not in restorable:
            raise FormatError(f"join: the leader resumes at iteration {resume}, this party can restore {restorable}")
        if plan.mode == TRAIN and self._optimizer is None:
            raise UsageError(f"{self.party}: the leader's plan trains, but this follower has no optimizer")
        instance = session.split(":", 1)[0]
        try:
            self._check_leader_sealed(answer.meta, restarted=bool(self._instance) and instance != self._instance)
        except Rejected as refused:
            self._bridge.refuse(refused)  # the leader stops at once instead of waiting for this follower
            raise
        self._bridge.session = session
        self._instance = instance
        self._plan = plan
        if self.prepare is not None and plan.mode == TRAIN:
            train, _ = plan.split()
            self._party_state.update_initial(self.prepare(np.sort(aligned.rows[train])))
        self._restore(resume)
        if self._resumed_from is None:
            self._resumed_from = resume
        log.info("%s: joined at iteration %d of %d", self.party, resume, plan.total)
        return resume

    def _check_leader_sealed(self, meta: dict[str, Any], *, restarted: bool) -> None:
        """Peer-based rollback protection: a restarted leader must hold every checkpoint it had
        said it sealed. A live leader's word stands (it went back to a common checkpoint)."""
        sealed = meta_int(meta, "sealed", "join answer")
        if restarted and sealed < self._leader_sealed:
            raise Rejected(
                f"{self.party}: the leader came back with its newest checkpoint at iteration {sealed}, but it had "
                f"sealed the checkpoint of iteration {self._leader_sealed} before (this follower was told so): its "
                "newer checkpoints were deleted or rolled back; refusing to continue (peer-based rollback protection)",
                check="freshness",
            )
        self._leader_sealed = sealed

    def _restore(self, iteration: int) -> None:
        if iteration != self._position:
            checkpoint = self._party_state.restore(iteration, plan=self._plan, aligned=self._aligned)
            best = checkpoint.get("best") if checkpoint is not None else None
            if best is not None and not (isinstance(best, dict) and isinstance(best.get("model"), dict)
                                         and isinstance(best.get("iteration"), int)):
                raise FormatError(f"{self.party}: checkpoint of iteration {iteration}: its best evaluation "
                                  "is not a record with weights")
            self._best = best
        if self._storage is not None:
            self._storage.clear_checkpoints(after=iteration)
        self._position = iteration
        self._pending.clear()
        self._replies.clear()
        self._verdicts.clear()
        self._graph = None

    # --- iterations -------------------------------------------------------------------------

    def _iterate(self, resume: int) -> None:
        plan = self._plan
        assert plan is not None
        iteration = resume + 1
        while True:
            answer = self._bridge.call(START, {"iteration": iteration, "committed": self._position})
            status = answer.meta.get("status")
            if status == "wait":
                through = meta_int(answer.meta, "commit_through", "start answer")
                while self._pending and self._pending[0] <= through:
                    self._apply(self._pending.popleft())
                continue
            if status == "done" and iteration == plan.total:
                self._check_best(answer.meta, plan)
                self._bridge.leave()
                return
            if status != "open" or answer.meta.get("iteration") != iteration:
                raise FormatError(f"start of iteration {iteration}: unexpected answer {answer.meta}")
            self._leader_sealed = max(self._leader_sealed, meta_int(answer.meta, "sealed", "start answer"))
            self._send(plan.step(iteration))
            self._pending.append(iteration)
            while len(self._pending) >= plan.pipeline_depth:
                self._apply(self._pending.popleft())
            iteration += 1

    def _check_best(self, meta: dict[str, Any], plan: Plan) -> None:
        """keep_best: the leader's best evaluation (in its "done") must be the one this party kept."""
        if not plan.keep_best:
            return
        best = meta_int(meta, "best", "done answer")
        mine = -1 if self._best is None else self._best["iteration"]
        if best != mine:
            raise FormatError(f"{self.party}: the leader keeps the weights of iteration {best}, this party "
                              f"those of {mine}: the halves would come from different epochs")

    def _rows(self, step: Step) -> torch.Tensor:
        assert self._aligned is not None
        return torch.from_numpy(self._aligned.rows[step.positions])

    def _features(self, rows: torch.Tensor) -> torch.Tensor:
        return self._X[rows].to(self._device)

    def _send(self, step: Step) -> None:
        plan = self._plan
        assert plan is not None
        rows = self._rows(step)
        meta: dict[str, Any] = {"iteration": step.iteration, "name": ACTIVATIONS}
        if step.kind == TRAIN:
            self._model.train()
            activations = self._model(self._features(rows))
            self._graph = (step.iteration, self._steps, activations)
            if plan.pipeline_depth == 1:  # the gradient comes back in the same call
                meta["reply"] = GRADIENTS
            answer = self._bridge.call(SEND, meta, {ACTIVATIONS: activations.detach().cpu()})
            if answer.meta.get("status") == "reply":
                self._replies[step.iteration] = self._gradient(answer, step, activations.shape)
            return
        self._model.eval()
        with torch.no_grad():
            parts = [self._model(self._features(part)) for part in rows.split(self._eval_batch_size)]
        self._model.train()
        if step.kind == EVAL and plan.keep_best:  # the leader's verdict on this evaluation comes back
            meta["reply"] = VERDICT
        answer = self._bridge.call(SEND, meta, {ACTIVATIONS: torch.cat(parts).cpu()})
        if answer.meta.get("status") == "reply":
            self._verdicts[step.iteration] = self._verdict(answer, step)

    def _gradient(self, answer: Message, step: Step, shape: torch.Size) -> torch.Tensor:
        grad = answer.tensors.get(GRADIENTS)
        if not isinstance(grad, torch.Tensor) or grad.dtype != torch.float32 or grad.shape != shape:
            got = f"{getattr(grad, 'dtype', type(grad))} {list(getattr(grad, 'shape', []))}"
            raise FormatError(f"gradient of iteration {step.iteration}: expected float32 {list(shape)}, got {got}")
        return grad.to(self._device)

    def _verdict(self, answer: Message, step: Step) -> bool:
        best = answer.meta.get("best")
        if not isinstance(best, bool):
            raise FormatError(f"verdict of iteration {step.iteration}: 'best' must be true or false, got {best!r}")
        return best

    def _judged(self, step: Step) -> None:
        """keep_best: wait for the leader's verdict on this evaluation; snapshot the half if it is the best."""
        verdict = self._verdicts.pop(step.iteration, None)
        while verdict is None:
            answer = self._bridge.call(RECV, {"iteration": step.iteration, "name": VERDICT})
            if answer.meta.get("status") == "reply":
                verdict = self._verdict(answer, step)
            elif answer.meta.get("status") != "wait":
                raise FormatError(f"verdict of iteration {step.iteration}: unexpected answer {answer.meta}")
        if verdict:
            self._best = {"iteration": step.iteration, "model": snapshot(self._model, None)["model"]}

    def _apply(self, iteration: int) -> None:
        plan = self._plan
        assert plan is not None
        step = plan.step(iteration)
        if step.kind == TRAIN:
            self._step(step)
            self._applied.append(iteration)
        elif step.kind == EVAL and plan.keep_best:
            self._judged(step)
        self._position = iteration
        if self._storage is not None and plan.is_checkpoint(iteration):
            assert self._aligned is not None
            extra = {"best": self._best} if self._best is not None else None
            self._party_state.save(iteration, plan=plan, aligned=self._aligned, extra=extra)
        if step.kind == EVAL:
            log.info("%s: epoch %d/%d done (iteration %d)", self.party, step.epoch + 1, plan.epochs, iteration)

    def _step(self, step: Step) -> None:
        graph = self._graph
        if graph is not None and graph[0] == step.iteration and graph[1] == self._steps:
            activations = graph[2]
        else:  # parameters changed since that forward, or the graph is gone: recompute
            self._model.train()
            activations = self._model(self._features(self._rows(step)))
        self._graph = None
        grad = self._replies.pop(step.iteration, None)
        while grad is None:
            answer = self._bridge.call(RECV, {"iteration": step.iteration, "name": GRADIENTS})
            if answer.meta.get("status") == "reply":
                grad = self._gradient(answer, step, activations.shape)
            elif answer.meta.get("status") != "wait":
                raise FormatError(f"gradient of iteration {step.iteration}: unexpected answer {answer.meta}")
        assert self._optimizer is not None
        self._optimizer.zero_grad(set_to_none=True)
        activations.backward(grad)
        self._optimizer.step()
        self._steps += 1


def predict_as_follower(
    client: AttestedClient,
    *,
    X: Any,  # noqa: N803
    ids: Ids,
    model: nn.Module,
    alignment: str = "ecdh-psi",
    eval_batch_size: int = 4096,
    reconnect_timeout_s: float = 120.0,
    alignment_workers: int | None = None,
    poll_s: float = DEFAULT_POLL_S,
    device: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """The follower's side of `predict_as_leader`: activations for the aligned rows; returns a summary."""
    follower = Follower(
        client, X=X, ids=ids, model=model, alignment=alignment, eval_batch_size=eval_batch_size,
        reconnect_timeout_s=reconnect_timeout_s, alignment_workers=alignment_workers, poll_s=poll_s, device=device,
    )  # fmt: skip
    return follower.run()
