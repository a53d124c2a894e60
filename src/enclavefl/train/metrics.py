"""Evaluation metrics from model outputs, and their aggregation across parties.

Binary tasks give logits [n] (or [n, 1]) and labels in {0, 1}; multi-class tasks give
logits [n, C] and int labels in [0, C); regression gives predictions [n] (or [n, 1]) and
real labels. Without a named task, one output column means binary and several mean
multi-class (what every job did before tasks were named). Log loss is computed from logits in float64
(log-sum-exp, so a confident wrong logit costs its size, never inf). AUC of labels of a
single class is undefined: `binary_auc` and `EvalStats.summary` return NaN for it.

Federated evaluation: every party reduces its rows to `EvalStats`, additive sufficient
statistics (example count, correct predictions, loss sum, per-class counts of true labels,
predictions and hits (macro-F1), for regression the sums of absolute errors, labels and
squared labels (MAE, R^2; the loss sum is the squared error), and, for binary tasks, the
histograms of positives' and negatives' logits over `AUC_BINS` bins uniform in logit
space on [-AUC_LOGIT_RANGE, AUC_LOGIT_RANGE], clamped at the ends), and the server adds
them. Accuracy and log loss aggregate exactly. AUC from the histograms counts a
positive/negative pair in the same bin as half right, so it differs from the exact AUC
by at most `auc_max_error` = 0.5 * sum_b pos_b * neg_b / (P * N), which the summary
reports. We chose that over sending scores and labels (exact) because it is fixed-size
(2 x 8192 int64 = 128 KiB whatever the evaluation set) and tells the server only the
score distribution of each class, not every example's prediction. A user metric
(`fn(outputs, labels) -> float`) is not additive: each party reports its value times its
example count and the pooled value is the example-weighted mean of the parties' values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from enclavefl.errors import UsageError
from enclavefl.validate import is_int

__all__ = [
    "AUC_BINS",
    "AUC_LOGIT_RANGE",
    "EvalStats",
    "MetricFn",
    "TaskType",
    "accuracy",
    "aggregate_stats",
    "binary_auc",
    "compute_metrics",
    "eval_stats",
    "histogram_auc",
    "log_loss",
    "macro_f1",
]

AUC_BINS = 8192
AUC_LOGIT_RANGE = 16.0

TaskType = Literal["binary", "multiclass", "regression"]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]
"""A user metric: fn(outputs, labels) -> float, on one party's evaluation rows."""

_FLOAT_FIELDS = ("loss_sum", "abs_error_sum", "label_sum", "label_sq_sum")
_CLASS_FIELDS = ("class_true", "class_pred", "class_hit")
_USER_PREFIX = "user."


def _task(
    logits: torch.Tensor, labels: torch.Tensor, task: TaskType | None = None
) -> tuple[TaskType, torch.Tensor, torch.Tensor]:
    """Checked (task, outputs, labels); one-column outputs flattened to [n]."""
    logits, labels = _shaped(logits, labels)
    if task is None:
        task = "binary" if logits.dim() == 1 else "multiclass"
    if task in ("binary", "regression") and logits.dim() != 1:
        raise UsageError(f"a {task} task needs one output per example, got outputs {list(logits.shape)}")
    if task == "regression":
        if labels.dtype == torch.bool or not bool(torch.isfinite(labels.double()).all()):
            raise UsageError("regression labels must be finite numbers")
        return task, logits, labels.double()
    if task == "binary":
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise UsageError("binary labels must be 0 or 1")
        return task, logits, labels
    if task != "multiclass":
        raise UsageError(f"unknown task {task!r}; one of binary, multiclass, regression")
    _check_multiclass(logits, labels)
    return task, logits, labels


def _shaped(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite float outputs [n] or [n, C] and labels [n] for n >= 1 examples, detached."""
    if not logits.is_floating_point():
        raise UsageError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if logits.dim() not in (1, 2) or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise UsageError(
            f"expected logits [n] or [n, C] and labels [n], got {list(logits.shape)} and {list(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise UsageError("cannot evaluate zero examples")
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise UsageError(f"logits hold {bad} NaN or infinite values (did training diverge?)")
    return logits.detach(), labels.detach()


def _check_multiclass(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Outputs [n, C] and integer labels in [0, C)."""
    if logits.dim() != 2:
        raise UsageError(f"a multiclass task needs outputs [n, C], got {list(logits.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise UsageError(f"multi-class labels must be integers, got {labels.dtype}")
    classes = logits.shape[1]
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise UsageError(
            f"multi-class labels must lie in [0, {classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )


def _predicted(task: TaskType, logits: torch.Tensor) -> torch.Tensor:
    return (logits > 0).long() if task == "binary" else logits.argmax(dim=1)


def _correct(task: TaskType, logits: torch.Tensor, labels: torch.Tensor) -> int:
    if task == "regression":
        return 0
    return int((_predicted(task, logits) == labels.long()).sum())


def _loss_sum(task: TaskType, logits: torch.Tensor, labels: torch.Tensor) -> float:
    if task == "regression":
        return float(((logits.double() - labels) ** 2).sum())
    if task == "binary":
        return float(F.binary_cross_entropy_with_logits(logits.double(), labels.double(), reduction="sum"))
    return float(F.cross_entropy(logits.double(), labels.long(), reduction="sum"))


def _class_counts(task: TaskType, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per class: true labels, predictions, hits (int64 [C]; C = 2 for binary)."""
    classes = 2 if task == "binary" else int(logits.shape[1])
    predicted, truth = _predicted(task, logits), labels.long()
    return (
        torch.bincount(truth, minlength=classes),
        torch.bincount(predicted, minlength=classes),
        torch.bincount(truth[predicted == truth], minlength=classes),
    )


def _macro_f1(true: torch.Tensor, pred: torch.Tensor, hit: torch.Tensor) -> float:
    """Mean F1 = 2 hit / (true + pred) over the classes that occur in labels or predictions (as sklearn)."""
    seen = (true + pred) > 0
    return float((2 * hit[seen].double() / (true[seen] + pred[seen]).double()).mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction predicted right: argmax for multi-class, logit > 0 for binary."""
    task, logits, labels = _task(logits, labels)
    return _correct(task, logits, labels) / logits.shape[0]


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy (natural log) computed from logits."""
    task, logits, labels = _task(logits, labels)
    return _loss_sum(task, logits, labels) / logits.shape[0]


def macro_f1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Unweighted mean of the per-class F1 scores (binary: over classes 0 and 1)."""
    task, logits, labels = _task(logits, labels)
    return _macro_f1(*_class_counts(task, logits, labels))


def binary_auc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC of binary logits or scores; NaN when labels hold one class."""
    task, logits, labels = _task(logits, labels)
    if task != "binary":
        raise UsageError(f"binary_auc needs binary logits [n], got {list(logits.shape)}")
    positives = int(labels.sum())
    if positives in (0, labels.shape[0]):
        return math.nan
    return _rank_auc(logits.double().numpy(), labels.numpy() > 0.5)


def _rank_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Exact ROC AUC as the Mann-Whitney statistic, ties given their average rank (what
    sklearn's roc_auc_score computes, without importing sklearn and scipy: seconds at start)."""
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(ordered)]
    ranks = np.empty(len(ordered), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def histogram_auc(positive: torch.Tensor, negative: torch.Tensor) -> tuple[float, float]:
    """(AUC, maximum error) from per-bin counts of positives and negatives, bins ascending."""
    pos, neg = positive.double(), negative.double()
    total = float(pos.sum()) * float(neg.sum())
    if total == 0:
        return math.nan, math.nan
    below = torch.cumsum(neg, dim=0) - neg
    auc = float((pos * (below + 0.5 * neg)).sum()) / total
    return auc, float(0.5 * (pos * neg).sum()) / total


def _check_counts(what: str, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The first of equally shaped int64 [>= 2] count vectors, or None when all are None."""
    present = [t is not None for t in tensors]
    if not any(present):
        return None
    if not all(present):
        raise UsageError(f"EvalStats needs all {what} or none")
    first = tensors[0]
    assert first is not None
    for t in tensors:
        assert t is not None
        if t.dtype != torch.int64 or t.dim() != 1 or t.shape != first.shape or t.numel() < 2:
            raise UsageError(f"EvalStats {what} must be int64 [bins >= 2] of equal size, got {t.dtype} {list(t.shape)}")
        if int(t.min()) < 0:
            raise UsageError(f"EvalStats {what} must not hold negative counts")
    return first


@dataclass(frozen=True, eq=False)
class EvalStats:
    """Additive sufficient statistics of one party's evaluation (see the module docstring).

    Classification fills `correct`, the per-class counts and (binary) the AUC histograms;
    regression fills `abs_error_sum`, `label_sum` and `label_sq_sum`, and `loss_sum` is
    its squared error. `user_sums` maps a user metric's name to value * count.
    """

    count: int
    correct: int
    loss_sum: float
    auc_positive: torch.Tensor | None = None
    auc_negative: torch.Tensor | None = None
    class_true: torch.Tensor | None = None
    class_pred: torch.Tensor | None = None
    class_hit: torch.Tensor | None = None
    abs_error_sum: float | None = None
    label_sum: float | None = None
    label_sq_sum: float | None = None
    user_sums: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for field_name in ("count", "correct"):
            value = getattr(self, field_name)
            if not is_int(value):
                raise UsageError(f"EvalStats.{field_name} must be an int, got {value!r}")
        if self.count < 1 or not 0 <= self.correct <= self.count:
            raise UsageError(
                f"EvalStats needs count >= 1 and 0 <= correct <= count, got {self.count}, {self.correct}"
            )
        if not math.isfinite(self.loss_sum) or self.loss_sum < 0:
            raise UsageError(f"EvalStats.loss_sum must be finite and >= 0, got {self.loss_sum!r}")
        classified = self._check_auc_histograms() | self._check_class_counts()
        self._check_regression_sums(classified=classified)
        for name, value in self.user_sums.items():
            if not isinstance(name, str) or not name or not math.isfinite(value):
                raise UsageError(f"EvalStats user metric {name!r}: needs a name and a finite value, got {value!r}")

    def _check_auc_histograms(self) -> bool:
        """The AUC histograms, if any, count every example; True when there are some."""
        pos = _check_counts("AUC histograms", (self.auc_positive, self.auc_negative))
        if pos is None:
            return False
        counted = int(pos.sum()) + int(self.auc_negative.sum())  # type: ignore[union-attr]
        if counted != self.count:
            raise UsageError(f"EvalStats AUC histograms count {counted} examples, not {self.count}")
        return True

    def _check_class_counts(self) -> bool:
        """The per-class counts, if any, add up and agree with `correct`; True when there are some."""
        true = _check_counts("class counts", (self.class_true, self.class_pred, self.class_hit))
        if true is None:
            return False
        pred, hit = self.class_pred, self.class_hit
        assert pred is not None and hit is not None
        if int(true.sum()) != self.count or int(pred.sum()) != self.count:
            raise UsageError(f"EvalStats class counts do not add up to the {self.count} examples")
        if bool((hit > torch.minimum(true, pred)).any()) or int(hit.sum()) != self.correct:
            raise UsageError("EvalStats class hits exceed the class counts or differ from correct")
        return True

    def _check_regression_sums(self, *, classified: bool) -> None:
        """Regression sums come all together, finite, and never with classification statistics."""
        regression = [getattr(self, f) for f in ("abs_error_sum", "label_sum", "label_sq_sum")]
        if all(v is None for v in regression):
            return
        if any(v is None or not math.isfinite(v) for v in regression):
            raise UsageError("EvalStats regression sums must all be given and finite")
        if self.abs_error_sum < 0 or self.label_sq_sum < 0:  # type: ignore[operator]
            raise UsageError("EvalStats abs_error_sum and label_sq_sum must be >= 0")
        if self.correct or classified:
            raise UsageError("EvalStats of a regression task hold no classification statistics")

    @property
    def task(self) -> TaskType | None:
        """regression, binary (AUC histograms), or None (multi-class, or classification without AUC)."""
        if self.label_sum is not None:
            return "regression"
        return "binary" if self.auc_positive is not None else None

    def __add__(self, other: EvalStats) -> EvalStats:
        if (self.auc_positive is None) != (other.auc_positive is None):
            raise UsageError("cannot add binary-task EvalStats (with AUC histograms) to multi-class ones")
        if (self.label_sum is None) != (other.label_sum is None):
            raise UsageError("cannot add regression EvalStats to classification ones")
        if (self.class_true is None) != (other.class_true is None):
            raise UsageError("cannot add EvalStats with class counts to ones without")
        if sorted(self.user_sums) != sorted(other.user_sums):
            names = (sorted(self.user_sums), sorted(other.user_sums))
            raise UsageError(f"cannot add EvalStats of user metrics {names[0]} and {names[1]}")
        pos, other_pos = self.auc_positive, other.auc_positive
        if pos is not None and other_pos is not None and pos.shape != other_pos.shape:
            raise UsageError(f"cannot add EvalStats with {pos.numel()} and {other_pos.numel()} AUC bins")
        true, other_true = self.class_true, other.class_true
        if true is not None and other_true is not None and true.shape != other_true.shape:
            raise UsageError(f"cannot add EvalStats of {true.numel()} and {other_true.numel()} classes")

        def add(name: str) -> Any:
            mine = getattr(self, name)
            return None if mine is None else mine + getattr(other, name)

        summed = ("auc_positive", "auc_negative", *_CLASS_FIELDS, "abs_error_sum", "label_sum", "label_sq_sum")
        return EvalStats(
            self.count + other.count,
            self.correct + other.correct,
            self.loss_sum + other.loss_sum,
            user_sums={name: value + other.user_sums[name] for name, value in self.user_sums.items()},
            **{name: add(name) for name in summed},
        )

    def summary(self) -> dict[str, float]:
        """examples and, for classification, accuracy, log_loss, macro_f1 (with class counts), auc and
        auc_max_error (binary); for regression mse, rmse, mae, r2; then each user metric."""
        n = self.count
        out = {"examples": float(n)}
        if self.label_sum is not None:
            assert self.label_sq_sum is not None and self.abs_error_sum is not None  # checked at construction
            mse = self.loss_sum / n
            total = self.label_sq_sum - self.label_sum**2 / n
            out.update(mse=mse, rmse=math.sqrt(mse), mae=self.abs_error_sum / n)
            out["r2"] = 1 - self.loss_sum / total if total > 1e-12 * max(self.label_sq_sum, 1.0) else math.nan
        else:
            out.update(accuracy=self.correct / n, log_loss=self.loss_sum / n)
            if self.class_true is not None:
                out["macro_f1"] = _macro_f1(self.class_true, self.class_pred, self.class_hit)  # type: ignore[arg-type]
            if self.auc_positive is not None and self.auc_negative is not None:
                out["auc"], out["auc_max_error"] = histogram_auc(self.auc_positive, self.auc_negative)
        out.update({name: value / n for name, value in self.user_sums.items()})
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors for the wire."""
        out = {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "correct": torch.tensor([self.correct], dtype=torch.int64),
        }
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = torch.tensor([value], dtype=torch.float64)
        for name in ("auc_positive", "auc_negative", *_CLASS_FIELDS):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.clone()
        out.update({_USER_PREFIX + k: torch.tensor([v], dtype=torch.float64) for k, v in self.user_sums.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> EvalStats:
        expected = {"count": torch.int64, "correct": torch.int64, "loss_sum": torch.float64}
        scalars = {**expected, **{f: torch.float64 for f in _FLOAT_FIELDS[1:]}}
        counts = {"auc_positive", "auc_negative", *_CLASS_FIELDS}
        users = {k for k in tensors if k.startswith(_USER_PREFIX)}
        unknown = sorted(set(tensors) - set(scalars) - counts - users)
        missing = sorted(set(expected) - set(tensors))
        if unknown or missing:
            raise UsageError(f"evaluation statistics: missing {missing}, unexpected {unknown}")
        for name in [*(n for n in scalars if n in tensors), *sorted(users)]:
            t, dtype = tensors[name], scalars.get(name, torch.float64)
            if t.dtype != dtype or t.shape != (1,):
                raise UsageError(
                    f"evaluation statistic {name!r} must be {dtype} [1], got {t.dtype} {list(t.shape)}"
                )

        def scalar(name: str) -> float | None:
            return float(tensors[name][0]) if name in tensors else None

        return cls(
            int(tensors["count"][0]),
            int(tensors["correct"][0]),
            float(tensors["loss_sum"][0]),
            auc_positive=tensors.get("auc_positive"),
            auc_negative=tensors.get("auc_negative"),
            class_true=tensors.get("class_true"),
            class_pred=tensors.get("class_pred"),
            class_hit=tensors.get("class_hit"),
            abs_error_sum=scalar("abs_error_sum"),
            label_sum=scalar("label_sum"),
            label_sq_sum=scalar("label_sq_sum"),
            user_sums={name[len(_USER_PREFIX) :]: float(tensors[name][0]) for name in sorted(users)},
        )


def eval_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    task: TaskType | None = None,
    auc_bins: int | None = AUC_BINS,
    user_metrics: Mapping[str, MetricFn] | None = None,
) -> EvalStats:
    """This party's statistics; binary tasks get AUC histograms unless auc_bins is None.

    `task` None infers binary (one output column) or multi-class (several). Each of
    `user_metrics` is called as fn(outputs, labels) on these rows.
    """
    raw_logits, raw_labels = logits, labels
    task, logits, labels = _task(logits, labels, task)
    count = int(logits.shape[0])
    correct, loss = _correct(task, logits, labels), _loss_sum(task, logits, labels)
    users = {name: _user_value(name, fn, raw_logits, raw_labels) * count for name, fn in (user_metrics or {}).items()}
    if task == "regression":
        predictions = logits.double()
        return EvalStats(
            count, 0, loss,
            abs_error_sum=float((predictions - labels).abs().sum()),
            label_sum=float(labels.sum()),
            label_sq_sum=float((labels**2).sum()),
            user_sums=users,
        )  # fmt: skip
    true, pred, hit = _class_counts(task, logits, labels)
    if task == "multiclass" or auc_bins is None:
        return EvalStats(count, correct, loss, None, None, true, pred, hit, user_sums=users)
    if not is_int(auc_bins) or auc_bins < 2:
        raise UsageError(f"auc_bins must be an int >= 2, got {auc_bins!r}")
    scaled = (logits.double() + AUC_LOGIT_RANGE) * (auc_bins / (2 * AUC_LOGIT_RANGE))
    bins = scaled.floor().clamp(0, auc_bins - 1).long()
    positive = labels == 1
    return EvalStats(
        count,
        correct,
        loss,
        torch.bincount(bins[positive], minlength=auc_bins),
        torch.bincount(bins[~positive], minlength=auc_bins),
        true,
        pred,
        hit,
        user_sums=users,
    )


def _user_value(name: str, fn: MetricFn, logits: torch.Tensor, labels: torch.Tensor) -> float:
    try:
        value = float(fn(logits.detach(), labels.detach()))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"user metric {name!r} must return a number: {exc}") from None
    if not math.isfinite(value):
        raise UsageError(f"user metric {name!r} returned {value!r}, not a finite number")
    return value


def compute_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    task: TaskType | None = None,
    user_metrics: Mapping[str, MetricFn] | None = None,
) -> dict[str, float]:
    """Exact metrics of rows held in one place (the vertical leader): those of
    `EvalStats.summary` with the exact AUC instead of the histogram's, and no examples."""
    stats = eval_stats(logits, labels, task=task, auc_bins=None, user_metrics=user_metrics)
    out = {k: v for k, v in stats.summary().items() if k != "examples"}
    resolved, _, _ = _task(logits, labels, task)
    if resolved == "binary":
        out["auc"] = binary_auc(logits, labels)
    return out


def aggregate_stats(stats: Sequence[EvalStats]) -> EvalStats:
    """The sum of several parties' statistics."""
    if not stats:
        raise UsageError("cannot aggregate evaluation statistics of zero parties")
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    return total
