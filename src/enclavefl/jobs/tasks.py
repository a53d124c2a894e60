"""The job's task on one party: its loss, its metrics and the check of its labels.

Resolved from the job file's `task:` section and metrics list. A user's loss or metric
named as 'package.module:function' is resolved by `enclavefl.jobs.refs.resolve_ref`
(only the job's own measured code), inside the party.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from enclavefl.errors import ConfigError
from enclavefl.jobs.config import JobConfig, metric_name
from enclavefl.jobs.datasets import PartyData
from enclavefl.jobs.refs import resolve_ref
from enclavefl.train.losses import LossFn, default_loss, loss_function
from enclavefl.train.metrics import MetricFn
from enclavefl.train.tasks import LOSSES, METRICS, TaskType, check_labels, task_for_width

__all__ = ["JobTask", "check_party_data", "first_rows", "job_task", "output_width"]


@dataclass(frozen=True)
class JobTask:
    """`type` None: classification by the model's output width (1: binary, more: multiclass)."""

    type: TaskType | None
    loss: LossFn
    classes: int | None = None
    metrics: dict[str, MetricFn] = field(default_factory=dict)
    """The user's metrics, by the name they are reported under."""
    names: tuple[str, ...] = ()
    """Every metric to report (built-ins and the user's), by reported name."""

    def resolved(self, width: int) -> TaskType:
        """The task type for a model with `width` outputs per example; refuses a misfit."""
        kind = self.type or task_for_width(width)
        if kind in ("binary", "regression") and width != 1:
            raise ConfigError(f"task.type: a {kind} model outputs one column per example, this model outputs {width}")
        if kind == "multiclass":
            if width < 2:
                raise ConfigError(
                    f"task.type: a multiclass model outputs one column per class, this model outputs {width}"
                )
            if self.classes is not None and self.classes != width:
                raise ConfigError(f"task.classes: {self.classes}, but the model outputs {width} columns")
        return kind


def job_task(job: JobConfig) -> JobTask:
    """The task of `job`, with its loss and user metrics imported."""
    task = job.task
    names = tuple(metric_name(m) for m in job.metrics())
    where = "evaluation.metrics" if job.mode == "hfl" else "training.metrics"
    code = job.job_code()
    metrics = {metric_name(m): resolve_ref(m, what=where, code=code) for m in job.metrics() if m not in METRICS}
    if task is None:
        return JobTask(None, default_loss, None, metrics, names)
    assert task.loss is not None  # the config fills in the task's default
    if task.loss in LOSSES:
        loss = loss_function(task.loss, task.type)
    else:
        loss = resolve_ref(task.loss, what="task.loss", code=code)
    return JobTask(task.type, loss, task.classes, metrics, names)


def output_width(model: nn.Module, *inputs: Any) -> int:
    """Outputs per example of `model`, from one forward pass on the first row (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() not in (1, 2):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model must return outputs [N] or [N, C], got {shape}")
    return 1 if out.dim() == 1 else int(out.shape[1])


def first_rows(data: PartyData) -> tuple[torch.Tensor, ...]:
    """The first row of each model input, as tensors."""
    return tuple(torch.from_numpy(np.ascontiguousarray(x[:1])) for x in data.inputs)


def check_party_data(task: JobTask, kind: TaskType, data: Sequence[PartyData], *, width: int | None) -> None:
    """Refuse labels that `kind` cannot train on (each set of rows in `data` with labels)."""
    classes = task.classes or (width if kind == "multiclass" else None)
    for part in data:
        if part.labels is not None:
            check_labels(part.labels, kind, classes=classes, source=part.source, column=part.label_column,
                         ids=part.ids)
