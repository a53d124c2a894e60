"""The framework-neutral contract between enclavefl and user training code.

A trainer is any object with `fit` and `evaluate` (and, for `sync-sgd`/`async-sgd`,
`gradients`). Weights cross this boundary as an ordered mapping name -> numpy array,
so PyTorch, Keras/TensorFlow and anything else plug in the same way; the wire and the
strategies never see a framework tensor.

`config` is a plain dict the strategy builds for the round. Keys enclavefl always sets:
`round` (int, 1-based), `strategy` (the registry name); strategies add their settings
(FedProx: `mu`; local training: `local_epochs`, `lr` when the job names them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Config",
    "EvalResult",
    "FitResult",
    "GradResult",
    "GradientTrainer",
    "Rows",
    "StopTraining",
    "TableTrainer",
    "Trainer",
    "Weights",
]

Weights = Mapping[str, np.ndarray]
Config = Mapping[str, Any]


@dataclass(frozen=True)
class Rows:
    """Some rows of a 2-D table, e.g. the sparse gradient of an embedding table.

    `values[i]` belongs to row `indices[i]` (int64); a repeated index adds up. Rows not
    listed are zero, so only what a batch touched has to travel.
    """

    indices: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class FitResult:
    """What one round of local training returns.

    `weights` are the new local weights, or, with `is_update=True`, the deltas
    (new - received) for the same names. `num_examples` weights the worker in averaging.
    """

    weights: Weights
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    is_update: bool = False


@dataclass(frozen=True)
class EvalResult:
    """Evaluation of the given weights on the trainer's own evaluation rows."""

    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    stats: Mapping[str, np.ndarray] | None = None
    """Optional sufficient statistics (`enclavefl.train.metrics.EvalStats.to_tensors()` as
    numpy) that the server adds up across workers for exact pooled metrics (AUC included);
    without them it pools `loss` and `metrics` weighted by `num_examples`."""


@dataclass(frozen=True)
class GradResult:
    """Gradients of one step (one batch) at the given weights, for gradient strategies."""

    gradients: Mapping[str, np.ndarray | Rows]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    buffers: Weights = field(default_factory=dict)
    """Persistent non-trainable state after the step's forward pass (BatchNorm running
    statistics), so the server can move its copy as it does for rounds."""


class StopTraining(Exception):
    """Raised by `fit` to end this party's training cleanly: it sends nothing more and exits 0.

    For a limit the trainer itself enforces, e.g. a spent privacy budget; `reason` is
    recorded as the party's `stopped`, `report` (name -> number) with it.
    """

    def __init__(self, reason: str, message: str = "", report: Mapping[str, Any] | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason
        self.report = dict(report or {})


@runtime_checkable
class Trainer(Protocol):
    """Round-based local training (fedavg, fedprox, fedadam, robust aggregators)."""

    def fit(self, weights: Weights, config: Config) -> FitResult: ...

    def evaluate(self, weights: Weights, config: Config) -> EvalResult: ...


@runtime_checkable
class GradientTrainer(Trainer, Protocol):
    """A trainer that can also give per-step gradients (sync-sgd, async-sgd)."""

    def gradients(self, weights: Weights, config: Config) -> GradResult: ...


@runtime_checkable
class TableTrainer(Protocol):
    """Optional: a trainer whose model looks up rows of large tables (embeddings).

    `table_rows(which)` names the rows the trainer will read: `"next"` (the batch of the
    next `gradients` call), `"train"` (every training batch) or `"eval"`. The worker then
    fetches just those rows instead of whole tables; without it, whole tables travel.
    """

    def table_rows(self, which: str) -> Mapping[str, np.ndarray]: ...
