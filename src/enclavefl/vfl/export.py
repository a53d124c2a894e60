"""Export: each party writes its half of the trained model sealed, and reads it back.

The file holds the model's state dict (tensors only, read back with
`torch.load(weights_only=True)`), sealed with associated data binding the job id and the
artifact name "vfl-model/<party>", so one party's half cannot be swapped for another's.
Joint prediction then runs through the bridge (`predict_as_leader`, `predict_as_follower`).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import torch
from torch import nn

from enclavefl.errors import UsageError
from enclavefl.seal.keys import KeySource
from enclavefl.seal.sealed import read_sealed, write_sealed
from enclavefl.train.torch import load_saved

log = logging.getLogger("enclavefl.vfl")

MODEL_VERSION = 1


def _artifact(party: str) -> str:
    if not party:
        raise UsageError("export: the party name must not be empty")
    return f"vfl-model/{party}"


def export_model(
    model: nn.Module, path: str | os.PathLike[str], *, key: KeySource, job_id: str, party: str
) -> Path:
    """Seal `model`'s state dict to `path` (atomic); returns the path."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_sealed(path, key=key, job_id=job_id, name=_artifact(party), version=MODEL_VERSION) as out:
        out.write(buffer.getbuffer())
    log.info("party %s: model half sealed to %s", party, path)
    return path


def load_model(
    model: nn.Module, path: str | os.PathLike[str], *, key: KeySource, job_id: str, party: str
) -> nn.Module:
    """Unseal `path` into `model` (same architecture); returns the model."""
    plain = read_sealed(path, key=key, job_id=job_id, name=_artifact(party), version=MODEL_VERSION)
    state = load_saved(plain, source=path, what="exported model")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"{path}: the exported model does not fit this architecture: {exc}") from None
    return model
