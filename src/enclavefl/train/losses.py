"""Training losses computed from model outputs, shared by horizontal workers and the vertical leader.

`default_loss` infers the task from the outputs' shape (one column: binary, several:
multi-class), which is what every job did before tasks were named; `loss_function`
gives a task's named loss. Every loss is a mean over the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from enclavefl.errors import UsageError
from enclavefl.train.tasks import LOSSES, TaskType

__all__ = ["LossFn", "bce", "cross_entropy", "default_loss", "huber", "loss_function", "mae", "mse"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits for one logit per example, mean cross-entropy for several."""
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return bce(logits, labels)
    if logits.dim() != 2:
        raise UsageError(f"expected logits [N] or [N, C], got shape {list(logits.shape)}")
    return cross_entropy(logits, labels)


def _one_column(outputs: torch.Tensor, loss: str) -> torch.Tensor:
    if outputs.dim() == 2 and outputs.shape[1] == 1:
        return outputs[:, 0]
    if outputs.dim() != 1:
        raise UsageError(f"loss {loss} needs one output per example, got outputs {list(outputs.shape)}")
    return outputs


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = _one_column(logits, "bce")
    return F.binary_cross_entropy_with_logits(logits, labels.reshape(-1).to(logits.dtype))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise UsageError(f"loss cross_entropy needs logits [N, C], got {list(logits.shape)}")
    return F.cross_entropy(logits, labels.reshape(-1).long())


def mse(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    outputs = _one_column(outputs, "mse")
    return F.mse_loss(outputs, labels.reshape(-1).to(outputs.dtype))


def mae(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    outputs = _one_column(outputs, "mae")
    return F.l1_loss(outputs, labels.reshape(-1).to(outputs.dtype))


def huber(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Huber loss with delta 1 (quadratic within 1 of the label, linear beyond)."""
    outputs = _one_column(outputs, "huber")
    return F.huber_loss(outputs, labels.reshape(-1).to(outputs.dtype), delta=1.0)


_BUILTIN: dict[str, LossFn] = {"bce": bce, "cross_entropy": cross_entropy, "mse": mse, "mae": mae, "huber": huber}


def loss_function(name: str, task: TaskType | None = None) -> LossFn:
    """The built-in loss `name` (see `train.tasks.LOSSES`), checked against `task` when given."""
    if name not in _BUILTIN:
        raise UsageError(f"unknown loss {name!r}; one of {', '.join(_BUILTIN)} (or a module:function)")
    if task is not None and task not in LOSSES[name]:
        raise UsageError(f"loss {name} does not fit a {task} task (it fits {', '.join(LOSSES[name])})")
    return _BUILTIN[name]
