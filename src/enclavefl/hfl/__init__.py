"""Horizontal FL: a parameter server and workers that hold different rows of the same columns.

Names are loaded on first use, so `enclavefl.hfl.registry` (strategy names and their
parameters, read when a job file is validated) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AsyncSGD": "enclavefl.hfl.strategies",
    "CheckpointStore": "enclavefl.hfl.checkpoint",
    "Contribution": "enclavefl.hfl.contract",
    "CoordinateMedian": "enclavefl.hfl.robust",
    "FedAdam": "enclavefl.hfl.strategies",
    "FedAvg": "enclavefl.hfl.strategies",
    "FedProx": "enclavefl.hfl.strategies",
    "ParameterServer": "enclavefl.hfl.server",
    "QuorumLost": "enclavefl.hfl.server",
    "Strategy": "enclavefl.hfl.contract",
    "SyncSGD": "enclavefl.hfl.strategies",
    "TrimmedMean": "enclavefl.hfl.robust",
    "Worker": "enclavefl.hfl.worker",
    "builtin_trainer": "enclavefl.hfl.worker",
    "evaluate": "enclavefl.hfl.worker",
    "make_strategy": "enclavefl.hfl.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'enclavefl.hfl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
