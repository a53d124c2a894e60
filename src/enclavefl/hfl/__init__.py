"""Horizontal FL: a parameter server and workers that hold different rows of the same columns."""

from enclavefl.hfl.checkpoint import CheckpointStore
from enclavefl.hfl.server import ParameterServer, QuorumLost
from enclavefl.hfl.strategies import (
    AsyncSGD,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
    SyncSGD,
    make_strategy,
)
from enclavefl.hfl.worker import Worker, evaluate

__all__ = [
    "AsyncSGD",
    "CheckpointStore",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "ParameterServer",
    "QuorumLost",
    "Strategy",
    "SyncSGD",
    "Worker",
    "evaluate",
    "make_strategy",
]
