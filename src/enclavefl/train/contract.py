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
    "Trainer",
    "Weights",
]

Weights = Mapping[str, np.ndarray]
Config = Mapping[str, Any]


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


@dataclass(frozen=True)
class GradResult:
    """Gradients of one step (one batch) at the given weights, for gradient strategies."""

    gradients: Weights
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Trainer(Protocol):
    """Round-based local training (fedavg, fedprox, fedadam, robust aggregators)."""

    def fit(self, weights: Weights, config: Config) -> FitResult: ...

    def evaluate(self, weights: Weights, config: Config) -> EvalResult: ...


@runtime_checkable
class GradientTrainer(Trainer, Protocol):
    """A trainer that can also give per-step gradients (sync-sgd, async-sgd)."""

    def gradients(self, weights: Weights, config: Config) -> GradResult: ...
