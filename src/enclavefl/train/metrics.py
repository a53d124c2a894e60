"""Evaluation metrics from logits, and their aggregation across parties.

Binary tasks give logits [n] (or [n, 1]) and labels in {0, 1}; multi-class tasks give
logits [n, C] and int labels in [0, C). Log loss is computed from logits in float64
(log-sum-exp, so a confident wrong logit costs its size, never inf). AUC of labels of a
single class is undefined: `binary_auc` and `EvalStats.summary` return NaN for it.

Federated evaluation: every party reduces its rows to `EvalStats`, additive sufficient
statistics (example count, correct predictions, loss sum and, for binary tasks, the
histograms of positives' and negatives' logits over `AUC_BINS` bins uniform in logit
space on [-AUC_LOGIT_RANGE, AUC_LOGIT_RANGE], clamped at the ends), and the server adds
them. Accuracy and log loss aggregate exactly. AUC from the histograms counts a
positive/negative pair in the same bin as half right, so it differs from the exact AUC
by at most `auc_max_error` = 0.5 * sum_b pos_b * neg_b / (P * N), which the summary
reports. We chose that over sending scores and labels (exact) because it is fixed-size
(2 x 8192 int64 = 128 KiB whatever the evaluation set) and tells the server only the
score distribution of each class, not every example's prediction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from enclavefl.errors import UsageError

__all__ = [
    "AUC_BINS",
    "AUC_LOGIT_RANGE",
    "EvalStats",
    "accuracy",
    "aggregate_stats",
    "binary_auc",
    "eval_stats",
    "histogram_auc",
    "log_loss",
]

AUC_BINS = 8192
AUC_LOGIT_RANGE = 16.0

Task = Literal["binary", "multiclass"]


def _task(logits: torch.Tensor, labels: torch.Tensor) -> tuple[Task, torch.Tensor, torch.Tensor]:
    """Checked (task, logits, labels); binary logits flattened to [n]."""
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
    logits = logits.detach()
    labels = labels.detach()
    if logits.dim() == 1:
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise UsageError("binary labels must be 0 or 1")
        return "binary", logits, labels
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise UsageError(f"multi-class labels must be integers, got {labels.dtype}")
    classes = logits.shape[1]
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise UsageError(
            f"multi-class labels must lie in [0, {classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    return "multiclass", logits, labels


def _correct(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> int:
    predicted = (logits > 0).to(labels.dtype) if task == "binary" else logits.argmax(dim=1)
    return int((predicted == labels).sum())


def _loss_sum(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> float:
    if task == "binary":
        return float(F.binary_cross_entropy_with_logits(logits.double(), labels.double(), reduction="sum"))
    return float(F.cross_entropy(logits.double(), labels.long(), reduction="sum"))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction predicted right: argmax for multi-class, logit > 0 for binary."""
    task, logits, labels = _task(logits, labels)
    return _correct(task, logits, labels) / logits.shape[0]


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy (natural log) computed from logits."""
    task, logits, labels = _task(logits, labels)
    return _loss_sum(task, logits, labels) / logits.shape[0]


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


@dataclass(frozen=True, eq=False)
class EvalStats:
    """Additive sufficient statistics of one party's evaluation (see the module docstring)."""

    count: int
    correct: int
    loss_sum: float
    auc_positive: torch.Tensor | None = None
    auc_negative: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for field_name in ("count", "correct"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"EvalStats.{field_name} must be an int, got {value!r}")
        if self.count < 1 or not 0 <= self.correct <= self.count:
            raise UsageError(
                f"EvalStats needs count >= 1 and 0 <= correct <= count, got {self.count}, {self.correct}"
            )
        if not math.isfinite(self.loss_sum) or self.loss_sum < 0:
            raise UsageError(f"EvalStats.loss_sum must be finite and >= 0, got {self.loss_sum!r}")
        pos, neg = self.auc_positive, self.auc_negative
        if (pos is None) != (neg is None):
            raise UsageError("EvalStats needs both AUC histograms or neither")
        if pos is not None and neg is not None:
            for h in (pos, neg):
                if h.dtype != torch.int64 or h.dim() != 1 or h.shape != pos.shape or h.numel() < 2:
                    raise UsageError(
                        "EvalStats AUC histograms must be int64 [bins >= 2] of equal size, "
                        f"got {h.dtype} {list(h.shape)}"
                    )
                if int(h.min()) < 0:
                    raise UsageError("EvalStats AUC histograms must not hold negative counts")
            counted = int(pos.sum()) + int(neg.sum())
            if counted != self.count:
                raise UsageError(f"EvalStats AUC histograms count {counted} examples, not {self.count}")

    def __add__(self, other: EvalStats) -> EvalStats:
        counts = (self.count + other.count, self.correct + other.correct, self.loss_sum + other.loss_sum)
        if self.auc_positive is None and other.auc_positive is None:
            return EvalStats(*counts)
        if self.auc_positive is None or other.auc_positive is None:
            raise UsageError("cannot add binary-task EvalStats (with AUC histograms) to multi-class ones")
        if self.auc_positive.shape != other.auc_positive.shape:
            bins = (self.auc_positive.numel(), other.auc_positive.numel())
            raise UsageError(f"cannot add EvalStats with {bins[0]} and {bins[1]} AUC bins")
        return EvalStats(
            *counts,
            self.auc_positive + other.auc_positive,
            self.auc_negative + other.auc_negative,  # type: ignore[operator]
        )

    def summary(self) -> dict[str, float]:
        """examples, accuracy, log_loss and, for binary tasks, auc and auc_max_error."""
        out = {
            "examples": float(self.count),
            "accuracy": self.correct / self.count,
            "log_loss": self.loss_sum / self.count,
        }
        if self.auc_positive is not None and self.auc_negative is not None:
            out["auc"], out["auc_max_error"] = histogram_auc(self.auc_positive, self.auc_negative)
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors for the wire."""
        out = {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "correct": torch.tensor([self.correct], dtype=torch.int64),
            "loss_sum": torch.tensor([self.loss_sum], dtype=torch.float64),
        }
        if self.auc_positive is not None and self.auc_negative is not None:
            out["auc_positive"] = self.auc_positive.clone()
            out["auc_negative"] = self.auc_negative.clone()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> EvalStats:
        expected = {"count": torch.int64, "correct": torch.int64, "loss_sum": torch.float64}
        optional = {"auc_positive", "auc_negative"}
        unknown = sorted(set(tensors) - set(expected) - optional)
        missing = sorted(set(expected) - set(tensors))
        if unknown or missing:
            raise UsageError(f"evaluation statistics: missing {missing}, unexpected {unknown}")
        for name, dtype in expected.items():
            t = tensors[name]
            if t.dtype != dtype or t.shape != (1,):
                raise UsageError(
                    f"evaluation statistic {name!r} must be {dtype} [1], got {t.dtype} {list(t.shape)}"
                )
        return cls(
            int(tensors["count"][0]),
            int(tensors["correct"][0]),
            float(tensors["loss_sum"][0]),
            tensors.get("auc_positive"),
            tensors.get("auc_negative"),
        )


def eval_stats(logits: torch.Tensor, labels: torch.Tensor, *, auc_bins: int | None = AUC_BINS) -> EvalStats:
    """This party's statistics; binary tasks get AUC histograms unless auc_bins is None."""
    task, logits, labels = _task(logits, labels)
    count = int(logits.shape[0])
    correct, loss = _correct(task, logits, labels), _loss_sum(task, logits, labels)
    if task == "multiclass" or auc_bins is None:
        return EvalStats(count, correct, loss)
    if isinstance(auc_bins, bool) or not isinstance(auc_bins, int) or auc_bins < 2:
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
    )


def aggregate_stats(stats: Sequence[EvalStats]) -> EvalStats:
    """The sum of several parties' statistics."""
    if not stats:
        raise UsageError("cannot aggregate evaluation statistics of zero parties")
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    return total
