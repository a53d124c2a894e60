"""Sealed checkpoints of the parameter server: one file per version, the newest N kept.

Each checkpoint is `torch.save` of a dict of tensors and plain values, written through
`enclavefl.seal.write_sealed` (atomic: the file appears complete or not at all) with
associated data (job id, artifact name, version). The file name carries the version, so
a file renamed to look newer, copied from another job or another artifact, altered or
truncated is refused with the `SealError` of the seal layer.

Resuming takes the newest file and never falls back silently: if the newest checkpoint
does not unseal, `load_latest` raises, and the operator decides (investigate, then remove
it to resume from the previous one). Plaintext never touches the disk; it is loaded with
`torch.load(weights_only=True)`, so even an authentic file cannot run code.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from enclavefl.errors import Check, FormatError, Rejected, SealError, UsageError
from enclavefl.seal.keys import KeySource
from enclavefl.seal.sealed import read_sealed, write_sealed
from enclavefl.train.torch import load_saved
from enclavefl.validate import is_int

__all__ = [
    "CheckpointStore",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger("enclavefl.hfl")

__all__ = ["SERVER_ARTIFACT", "CheckpointStore", "VersionRegister", "rng_state", "set_rng_state"]

SERVER_ARTIFACT = "hfl-server-checkpoint"
_SUFFIX = ".sealed"


class VersionRegister(Protocol):
    """A record of sealed versions the host cannot roll back (a key broker's register)."""

    @property
    def where(self) -> str: ...

    def recorded(self, artifact: str) -> int | None: ...

    def record(self, artifact: str, version: int) -> None: ...


class CheckpointStore:
    """Sealed checkpoints of one artifact in `directory` (created, mode 0700, if missing).

    With `freshness` (a key broker's version register), every saved version is recorded
    there, and `load_latest` refuses a newest checkpoint older than the recorded one, or
    none at all: deleting the newest files no longer makes a resume go back silently.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        key: KeySource,
        job_id: str,
        artifact: str = SERVER_ARTIFACT,
        keep_last: int = 3,
        freshness: VersionRegister | None = None,
    ) -> None:
        if not is_int(keep_last) or keep_last < 1:
            raise UsageError(f"keep_last must be an int >= 1, got {keep_last!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", artifact):
            raise UsageError(f"checkpoint artifact name must be [A-Za-z0-9._-]+, got {artifact!r}")
        self.directory = Path(directory)
        self.key = key
        self.job_id = job_id
        self.artifact = artifact
        self.keep_last = keep_last
        self.freshness = freshness
        self._pattern = re.compile(rf"{re.escape(artifact)}-v(\d{{10}}){re.escape(_SUFFIX)}")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create checkpoint directory {self.directory}: {exc.strerror}") from exc

    def path(self, version: int) -> Path:
        return self.directory / f"{self.artifact}-v{version:010d}{_SUFFIX}"

    def versions(self) -> list[int]:
        """Versions present, ascending (temporary files of unfinished writes are ignored)."""
        found = []
        for entry in self.directory.iterdir():
            match = self._pattern.fullmatch(entry.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def save(self, version: int, state: Mapping[str, Any]) -> Path:
        """Seal `state` as checkpoint `version`, then drop all but the newest `keep_last`."""
        path = self.path(version)
        with write_sealed(path, key=self.key, job_id=self.job_id, name=self.artifact, version=version) as stream:
            torch.save(dict(state), stream)
        if self.freshness is not None:
            # After the file is complete: a crash in between leaves the register one behind
            # (harmless), never ahead of what can be resumed.
            self.freshness.record(self.artifact, version)
        for old in self.versions()[: -self.keep_last]:
            self.path(old).unlink(missing_ok=True)
        return path

    def load(self, version: int) -> dict[str, Any]:
        """Checkpoint `version`; SealError if it is not authentic for this job and version."""
        path = self.path(version)
        plaintext = read_sealed(path, key=self.key, job_id=self.job_id, name=self.artifact, version=version)
        return load_saved(plaintext, source=path, what="checkpoint")

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        """(version, state) of the newest checkpoint, or None if there is none.

        A newest checkpoint that fails to unseal raises its SealError: it is never skipped
        in favour of an older one.
        """
        versions = self.versions()
        recorded = self.freshness.recorded(self.artifact) if self.freshness is not None else None
        newest = versions[-1] if versions else None
        if recorded is not None and (newest is None or newest < recorded):
            assert self.freshness is not None
            found = f"the newest checkpoint in {self.directory} is version {newest}" if newest is not None else (
                f"there is no checkpoint in {self.directory}")
            raise Rejected(
                f"refusing to resume {self.artifact}: {found}, but version {recorded} was sealed and recorded "
                f"with {self.freshness.where}: newer checkpoints were deleted or rolled back", check=Check.FRESHNESS,
            )
        if newest is None:
            return None
        try:
            return newest, self.load(newest)
        except SealError as exc:
            log.error(
                "refusing to resume: newest checkpoint %s failed verification (%s: %s); not falling back "
                "to an older one. Investigate, then remove that file to resume from the previous checkpoint.",
                self.path(newest), exc.check, exc.reason,
            )
            raise


def rng_state() -> dict[str, Any]:
    """The process's torch, numpy and Python RNG states, as checkpoint-safe values."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    try:
        torch.set_rng_state(state["torch"])
        saved = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": "MT19937",
                "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
                "has_gauss": saved["has_gauss"],
                "gauss": saved["gauss"],
            }
        )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise FormatError(f"checkpoint RNG state is malformed: {exc}") from exc
