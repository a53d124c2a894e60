"""User training code: the fit/evaluate contract and its framework adapters.

A leaf package: it knows nothing of the network, the TEE or the parameter server.
Metrics (`train.metrics`) and losses (`train.losses`) live here so that horizontal
workers, the parameter server and the vertical leader share one implementation.

The contract imports only numpy; `TorchTrainer` (and torch) load on first use, so a
trainer for another framework never pulls torch in.
"""

from __future__ import annotations

from enclavefl.lazy import lazy_exports
from enclavefl.train.contract import (
    Config,
    EvalResult,
    FitResult,
    GradientTrainer,
    GradResult,
    Rows,
    StopTraining,
    TableTrainer,
    Trainer,
    Weights,
)
from enclavefl.train.device import resolve_device

_LAZY = {"TorchTrainer": "enclavefl.train.torch", "TensorBatches": "enclavefl.train.torch"}

__all__ = [
    "Config",
    "EvalResult",
    "FitResult",
    "GradResult",
    "GradientTrainer",
    "Rows",
    "StopTraining",
    "TableTrainer",
    "TensorBatches",
    "TorchTrainer",
    "Trainer",
    "Weights",
    "resolve_device",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
