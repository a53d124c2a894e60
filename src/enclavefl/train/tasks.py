"""What a model learns: the task types, the losses and metrics each allows, and label checks.

Kept free of torch so that the job file's validation can use it cheaply. A job that
names no task is classification inferred from the model's output width (one column:
binary, several: multi-class), as every job was before tasks were named.

Labels are checked when a party loads its data, before it attests or aligns, so that a
regression file given to a classification job (or class 18 to a 10-class model) stops
with the file, the column and the offending value instead of failing mid-training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from enclavefl.errors import UsageError

__all__ = [
    "DEFAULT_LOSS",
    "DEFAULT_METRICS",
    "HIGHER_IS_BETTER",
    "LOSSES",
    "LOWER_IS_BETTER",
    "METRICS",
    "PRIMARY_METRICS",
    "TASK_TYPES",
    "TaskType",
    "better",
    "check_labels",
    "primary_metric",
    "task_for_width",
]

TaskType = Literal["binary", "multiclass", "regression"]
TASK_TYPES: tuple[TaskType, ...] = ("binary", "multiclass", "regression")

LOSSES: Mapping[str, tuple[TaskType, ...]] = {
    "bce": ("binary",),
    "cross_entropy": ("multiclass",),
    "mse": ("regression",),
    "mae": ("regression",),
    "huber": ("regression",),
}
"""Built-in losses (`train.losses.loss_function`) and the tasks each fits."""

DEFAULT_LOSS: Mapping[TaskType, str] = {"binary": "bce", "multiclass": "cross_entropy", "regression": "mse"}

METRICS: Mapping[str, tuple[TaskType, ...]] = {
    "accuracy": ("binary", "multiclass"),
    "auc": ("binary",),
    "logloss": ("binary", "multiclass"),
    "macro_f1": ("binary", "multiclass"),
    "rmse": ("regression",),
    "mae": ("regression",),
    "r2": ("regression",),
}
"""Built-in metrics (names in job files and summaries) and the tasks each is defined for."""

DEFAULT_METRICS: Mapping[TaskType, tuple[str, ...]] = {
    "binary": ("accuracy", "logloss"),
    "multiclass": ("accuracy", "logloss"),
    "regression": ("rmse", "mae", "r2"),
}

HIGHER_IS_BETTER = frozenset({"accuracy", "auc", "macro_f1", "r2"})
LOWER_IS_BETTER = frozenset({"logloss", "log_loss", "loss", "mse", "rmse", "mae"})
"""The metrics whose best value is the highest / the lowest (the others' direction is unknown)."""

PRIMARY_METRICS = ("auc", "accuracy", "r2", "macro_f1", "rmse", "mae", "logloss")
"""The metric that judges a model when none is named: the first of these that a job reports."""


def primary_metric(metrics: Sequence[str]) -> str | None:
    """The first of `PRIMARY_METRICS` among `metrics` (None: none of them)."""
    return next((name for name in PRIMARY_METRICS if name in metrics), None)


def better(metric: str, value: float, than: float | None) -> bool:
    """Whether `value` of `metric` beats `than` (None: nothing yet); NaN never does.
    Refuses a metric whose direction is unknown."""
    if metric in HIGHER_IS_BETTER:
        return not math.isnan(value) and (than is None or value > than)
    if metric in LOWER_IS_BETTER:
        return not math.isnan(value) and (than is None or value < than)
    raise UsageError(f"metric {metric!r}: whether higher or lower is better is unknown; "
                     f"choose one of {sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER)}")


def task_for_width(width: int) -> TaskType:
    """The classification task a model's output width implies when the job names none."""
    return "binary" if width == 1 else "multiclass"


def check_labels(
    labels: np.ndarray,
    task: TaskType,
    *,
    classes: int | None,
    source: str,
    column: str,
    ids: np.ndarray | None = None,
) -> None:
    """Refuse labels that cannot train `task`, naming `source` (a file), `column` and a bad
    value with its example id (`ids`, else its row number).

    Multi-class labels must be integers in [0, classes). Raises UsageError (exit 2).
    """
    values = np.asarray(labels)
    where = f"{source}, label column {column!r}"

    def at(bad: np.ndarray) -> str:
        row = int(np.argmax(bad))
        return f"at id {str(ids[row])!r}" if ids is not None else f"at row {row}"

    if values.ndim != 1:
        raise UsageError(f"{where}: expected one label per row, got shape {list(values.shape)}")
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise UsageError(f"{where}: labels must be numbers, got {values.dtype} (e.g. {values[:1].tolist()})")
    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values)
        if bad.any():
            raise UsageError(f"{where}: label {float(values[bad][0])} {at(bad)} is not a finite number")
    if task == "regression":
        return
    if task == "binary":
        bad = (values != 0) & (values != 1)
        if bad.any():
            raise UsageError(
                f"{where}: label {_shown(values[bad][0])} {at(bad)} in a binary task "
                "(labels must be 0 or 1; for real-valued targets set task.type: regression)"
            )
        return
    if task != "multiclass":
        raise UsageError(f"unknown task {task!r}; one of {', '.join(TASK_TYPES)}")
    bad = values != np.round(values)
    if bad.any():
        raise UsageError(
            f"{where}: label {_shown(values[bad][0])} {at(bad)} in a multiclass task "
            "(labels must be class numbers 0..C-1; for real-valued targets set task.type: regression)"
        )
    if classes is None:
        return
    bad = (values < 0) | (values >= classes)
    if bad.any():
        raise UsageError(
            f"{where}: label {_shown(values[bad][0])} {at(bad)} is not a class of this "
            f"{classes}-class task (labels must lie in 0..{classes - 1}; the model's output width, "
            "or task.classes, sets the number of classes)"
        )


def _shown(value: object) -> str:
    number = float(value)  # type: ignore[arg-type]
    return str(int(number)) if number.is_integer() else repr(number)
