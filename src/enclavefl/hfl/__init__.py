"""Horizontal FL: a parameter server and workers that hold different rows of the same columns.

Names are loaded on first use, so `enclavefl.hfl.registry` (strategy names and their
parameters, read when a job file is validated) imports without torch.
"""

from __future__ import annotations

from enclavefl.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
