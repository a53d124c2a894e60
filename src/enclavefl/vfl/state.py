"""A party's trainable state: its model and optimizer, their initial snapshot, and the
synchronized checkpoints it writes and goes back to. Leader and followers share it, so
both check a checkpoint the same way (alignment, plan, optimizer state) before loading it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from enclavefl.errors import UsageError
from enclavefl.vfl.errors import ResumeFailed
from enclavefl.vfl.plan import Plan
from enclavefl.vfl.storage import Aligned, Storage

__all__ = ["OptimizerArg", "PartyState", "build_optimizer", "snapshot"]

log = logging.getLogger("enclavefl.vfl")


OptimizerArg = torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer] | None
"""An optimizer over the model's parameters, or a factory fn(model) -> optimizer."""


_OPTIMIZER_METHODS = ("zero_grad", "step", "state_dict", "load_state_dict")


def _is_optimizer(value: object) -> bool:
    """A torch optimizer, or anything that steps and checkpoints like one (e.g. KerasOptimizer)."""
    if isinstance(value, torch.optim.Optimizer):
        return True
    return all(callable(getattr(value, m, None)) for m in _OPTIMIZER_METHODS)


def build_optimizer(model: nn.Module, optimizer: OptimizerArg) -> torch.optim.Optimizer | None:
    """The optimizer itself, or the factory's for `model` (call it once the model is on its device)."""
    if optimizer is None or _is_optimizer(optimizer):
        return cast("torch.optim.Optimizer | None", optimizer)
    if not callable(optimizer):
        raise UsageError(f"optimizer must be a torch optimizer or a factory fn(model), got {type(optimizer).__name__}")
    built = optimizer(model)
    if not _is_optimizer(built):
        raise UsageError(f"the optimizer factory returned {type(built).__name__}, not a torch.optim.Optimizer")
    return cast("torch.optim.Optimizer", built)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Detached copies of the model's and the optimizer's state."""
    return {
        "model": {name: t.detach().clone() for name, t in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
    }


class PartyState:
    """The live model and optimizer of `party`, restorable to iteration -1 (the state it was
    built with) or to any checkpoint in `storage`."""

    def __init__(
        self, party: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, storage: Storage | None
    ) -> None:
        self.party = party
        self.model = model
        self.optimizer = optimizer
        self.storage = storage
        self._initial = snapshot(model, optimizer)

    def update_initial(self, model_state: dict[str, torch.Tensor]) -> None:
        """Replace entries of the initial model state (e.g. standardizers fitted once aligned)."""
        self._initial["model"].update(model_state)

    def stored(self) -> list[int]:
        """Iterations this party can go back to: -1 and its checkpoints."""
        return [-1, *(self.storage.checkpoints() if self.storage is not None else [])]

    def restore(self, iteration: int, *, plan: Plan | None, aligned: Aligned | None) -> dict[str, Any] | None:
        """Load the state of `iteration` into the model and optimizer; returns the checkpoint
        (for the caller's own bookkeeping), or None for the initial state."""
        if iteration == -1:
            state, checkpoint = self._initial, None
        else:
            if self.storage is None:
                raise ResumeFailed(f"{self.party}: asked to restore iteration {iteration} without storage")
            state = checkpoint = self.storage.load_checkpoint(iteration)
            self._check(iteration, checkpoint, plan, aligned)
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        log.info("%s: restored iteration %d", self.party, iteration)
        return checkpoint

    def _check(self, iteration: int, state: dict[str, Any], plan: Plan | None, aligned: Aligned | None) -> None:
        what = f"{self.party}: checkpoint of iteration {iteration}"
        if plan is None or aligned is None:
            raise ResumeFailed(f"{what}: cannot be checked before this party has a plan and an alignment")
        if state.get("alignment") != aligned.alignment_id:
            raise ResumeFailed(f"{what} was written for another alignment")
        differences = plan.differences(Plan.from_meta(state.get("plan")))
        if differences:
            raise ResumeFailed(
                f"{what} was written for another plan ({'; '.join(differences)}): "
                "start the job without resume, or with its old settings"
            )
        if not isinstance(state.get("model"), dict):
            raise ResumeFailed(f"{what} holds no model state")
        if self.optimizer is not None and not isinstance(state.get("optimizer"), dict):
            raise ResumeFailed(f"{what} holds no optimizer state, and this party trains with an optimizer")

    def save(self, iteration: int, *, plan: Plan, aligned: Aligned, extra: dict[str, Any] | None = None) -> None:
        """Seal the state after `iteration` (with the caller's `extra` bookkeeping)."""
        assert self.storage is not None
        self.storage.save_checkpoint(iteration, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "plan": plan.to_meta(),
            "alignment": aligned.alignment_id,
            "iteration": iteration,
            **(extra or {}),
        })  # fmt: skip
