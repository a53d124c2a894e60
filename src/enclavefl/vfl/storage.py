"""A party's sealed state: its aligned order and its synchronized training checkpoints.

Every file is sealed (enclavefl.seal) with associated data binding the job id, an
artifact name that includes the party's name, and a version (the iteration, for a
checkpoint), so a file swapped for another party's, another job's or another
iteration's is refused. Checkpoints hold tensors and plain values only and are read
back with `torch.load(weights_only=True)`: no arbitrary pickle.

Sealing cannot stop the host from deleting the newest checkpoints. With `freshness` (a
key broker's version register, enclavefl.net.keybroker) every checkpoint carries a seal
number, one more than the party's last, recorded with the broker after the file is
written; `check_fresh` refuses to resume when the newest file's number is older than
the broker's. The number is not the iteration because a federation may legitimately go
back (to the newest checkpoint every party holds): the party then deletes its newer
files and seals the one it went back to again, under a new number.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cbor2
import numpy as np
import torch

from enclavefl.errors import FormatError, Rejected, UsageError
from enclavefl.seal.keys import KeySource
from enclavefl.seal.sealed import read_sealed, write_sealed
from enclavefl.train.torch import load_saved
from enclavefl.validate import is_int
from enclavefl.vfl.align import AlignmentResult

__all__ = ["FRESHNESS_ARTIFACT", "Aligned", "Storage", "VersionRecord", "ids_digest"]

log = logging.getLogger("enclavefl.vfl")

FRESHNESS_ARTIFACT = "vfl-checkpoint"  # this party's entry in the broker's version register

_ALIGNMENT_FILE = "alignment.sealed"
# Stored alignments are in the canonical order (enclavefl.vfl.align.canonical_order); one sealed
# without this mark is in an older protocol order and is aligned again, not reused.
_ORDER = "blake2b-id"
_CHECKPOINT_FILE = re.compile(r"checkpoint-(\d{10})\.sealed")


@dataclass(frozen=True, eq=False)
class Aligned:
    """The outcome of an alignment: this party's rows in the common (canonical) order.

    `alignment_id` (the protocol session, shared by every party of that alignment) tells
    whether two parties hold the same alignment, without revealing anything.
    """

    method: str
    alignment_id: str
    result: AlignmentResult

    @property
    def size(self) -> int:
        return self.result.size

    @property
    def rows(self) -> np.ndarray:
        return self.result.rows


def ids_digest(ids: Any) -> bytes:
    """SHA-256 of a party's id list, to notice a stored alignment made for other data."""
    digest = hashlib.sha256()
    for value in np.asarray(ids).tolist():
        digest.update(str(value).encode("utf-8") + b"\x00")
    return digest.digest()


class VersionRecord(Protocol):
    """Versions recorded where the host cannot roll them back (`BrokerVersions`)."""

    @property
    def where(self) -> str: ...

    def recorded(self, artifact: str) -> int | None: ...

    def record(self, artifact: str, version: int) -> None: ...


@dataclass(frozen=True)
class Storage:
    """Where one party keeps its sealed alignment and checkpoints.

    `checkpoint_every` (iterations) matters on the leader, which puts it in the plan;
    followers checkpoint at the iterations the plan names. `keep_last` >= 2, since
    parties may be one checkpoint apart when one of them dies. `freshness` (optional): the
    key broker's version register, which makes a resume refuse deleted newest checkpoints.
    """

    directory: Path
    key: KeySource
    job_id: str
    party: str
    checkpoint_every: int = 0
    keep_last: int = 3
    freshness: VersionRecord | None = None
    # The newest seal number this party knows of (None: not asked yet); a list, so the
    # frozen dataclass can move it.
    _seal: list[int | None] = field(default_factory=lambda: [None], init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.keep_last < 2:
            raise UsageError(
                f"storage keep_last must be at least 2 (parties may be one checkpoint apart), got {self.keep_last}"
            )
        if self.checkpoint_every < 0:
            raise UsageError(f"storage checkpoint_every must be >= 0, got {self.checkpoint_every}")
        object.__setattr__(self, "directory", Path(self.directory))

    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    # --- alignment --------------------------------------------------------------------------

    @property
    def _alignment_name(self) -> str:
        return f"vfl-alignment/{self.party}"

    def save_alignment(self, aligned: Aligned, ids: Any) -> None:
        self._ensure_dir()
        record = {
            "method": aligned.method,
            "alignment_id": aligned.alignment_id,
            "ids_sha256": ids_digest(ids),
            "rows": aligned.result.to_bytes(),
            "order": _ORDER,
        }
        with write_sealed(
            self.directory / _ALIGNMENT_FILE, key=self.key, job_id=self.job_id, name=self._alignment_name, version=1
        ) as out:
            out.write(cbor2.dumps(record, canonical=True))

    def load_alignment(self, ids: Any) -> Aligned | None:
        """The stored alignment, or None when there is none or it was made for other ids.

        A file that is altered or sealed for something else raises SealError.
        """
        path = self.directory / _ALIGNMENT_FILE
        if not path.exists():
            return None
        plain = read_sealed(path, key=self.key, job_id=self.job_id, name=self._alignment_name, version=1)
        try:
            record = cbor2.loads(plain)
            method, alignment_id = record["method"], record["alignment_id"]
            digest, rows = record["ids_sha256"], record["rows"]
        except (cbor2.CBORDecodeError, KeyError, TypeError) as exc:
            raise FormatError(f"{path}: stored alignment does not parse: {exc}") from None
        if not isinstance(method, str) or not isinstance(alignment_id, str) or not isinstance(rows, bytes):
            raise FormatError(f"{path}: stored alignment has fields of the wrong types")
        if digest != ids_digest(ids):
            log.warning("stored alignment %s was made for other ids than this party's data: aligning again", path)
            return None
        if record.get("order") != _ORDER:
            log.warning("stored alignment %s is not in the canonical order (sealed by an older version): aligning "
                        "again, so that the validation rows are the same in every run", path)
            return None
        return Aligned(method, alignment_id, AlignmentResult.from_bytes(rows))

    # --- checkpoints ------------------------------------------------------------------------

    @property
    def rollback_protection(self) -> str:
        """"key-broker" with a version register, else "peer-based" (the other parties notice)."""
        return "key-broker" if self.freshness is not None else "peer-based"

    @property
    def _checkpoint_name(self) -> str:
        return f"vfl-checkpoint/{self.party}"

    def _checkpoint_path(self, iteration: int) -> Path:
        return self.directory / f"checkpoint-{iteration:010d}.sealed"

    def checkpoints(self) -> list[int]:
        """Iterations with a checkpoint on disk, ascending."""
        if not self.directory.is_dir():
            return []
        found = (_CHECKPOINT_FILE.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save_checkpoint(self, iteration: int, state: Mapping[str, Any]) -> None:
        """Seal `state` as the checkpoint of `iteration`, then keep only the last `keep_last`."""
        if iteration < 0:
            raise UsageError(f"checkpoint iteration must be >= 0, got {iteration}")
        self._ensure_dir()
        seal = self._next_seal() if self.freshness is not None else None
        buffer = io.BytesIO()
        torch.save({**state, "seal": seal} if seal is not None else dict(state), buffer)
        with write_sealed(
            self._checkpoint_path(iteration), key=self.key, job_id=self.job_id, name=self._checkpoint_name,
            version=iteration,
        ) as out:
            out.write(buffer.getbuffer())
        if self.freshness is not None and seal is not None:
            # After the file is complete: a crash in between leaves the register one behind
            # (harmless), never ahead of what can be resumed.
            self.freshness.record(FRESHNESS_ARTIFACT, seal)
            self._seal[0] = seal
        for old in self.checkpoints()[: -self.keep_last]:
            self._checkpoint_path(old).unlink(missing_ok=True)
        log.debug("party %s: checkpoint of iteration %d sealed", self.party, iteration)

    def load_checkpoint(self, iteration: int) -> dict[str, Any]:
        path = self._checkpoint_path(iteration)
        if not path.exists():
            raise UsageError(f"no checkpoint of iteration {iteration} in {self.directory}")
        plain = read_sealed(path, key=self.key, job_id=self.job_id, name=self._checkpoint_name, version=iteration)
        return load_saved(plain, source=path, what="checkpoint")

    def clear_checkpoints(self, *, after: int = -1) -> None:
        """Remove the checkpoints of iterations > `after` (all by default): a new alignment or
        a fresh start makes them meaningless, and so does going back to an earlier one."""
        removed = [iteration for iteration in self.checkpoints() if iteration > after]
        for iteration in removed:
            self._checkpoint_path(iteration).unlink(missing_ok=True)
        if removed and self.freshness is not None and after in self.checkpoints():
            # Going back is legitimate here, but the register still holds the deleted files'
            # numbers: seal the checkpoint we went back to again, so the newest file is current.
            self.save_checkpoint(after, self.load_checkpoint(after))

    # --- rollback protection ----------------------------------------------------------------

    def check_fresh(self) -> None:
        """Before a resume: refuse when the broker recorded a newer checkpoint than the newest
        on disk (the host deleted or rolled back files). Without `freshness`, nothing to do."""
        if self.freshness is None:
            return
        recorded = self.freshness.recorded(FRESHNESS_ARTIFACT)
        stored = self.checkpoints()
        newest = stored[-1] if stored else None
        seal = self._seal_of(newest) if newest is not None else -1
        if recorded is not None and seal < recorded:
            found = (
                f"the newest checkpoint in {self.directory} (iteration {newest}) is version {seal}"
                if newest is not None else f"there is no checkpoint in {self.directory}"
            )
            raise Rejected(
                f"refusing to resume {FRESHNESS_ARTIFACT} of party {self.party}: {found}, but version {recorded} "
                f"was sealed and recorded with {self.freshness.where}: newer checkpoints were deleted or rolled back",
                check="freshness",
            )
        self._seal[0] = max(seal, -1 if recorded is None else recorded)

    def _seal_of(self, iteration: int) -> int:
        seal = self.load_checkpoint(iteration).get("seal")
        # A checkpoint sealed without a register has no number: older than any recorded one.
        return seal if is_int(seal) else -1

    def _next_seal(self) -> int:
        assert self.freshness is not None
        last = self._seal[0]
        if last is None:  # a fresh run: go on after what the register holds
            recorded = self.freshness.recorded(FRESHNESS_ARTIFACT)
            last = -1 if recorded is None else recorded
        return last + 1
