"""The parameter server's settings: the workers, the quorum, the cadences, the timeouts, the bounds.

Checked once, when the server is built, so every mistake is a UsageError naming the
setting before anything listens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from enclavefl.errors import UsageError
from enclavefl.validate import is_int, is_number

__all__ = ["ServerSettings"]


@dataclass(frozen=True)
class ServerSettings:
    """See `ParameterServer` for what each setting does."""

    workers: tuple[str, ...]
    total: int
    min_workers: int
    round_timeout_s: float
    quorum_timeout_s: float
    eval_every: int
    checkpoint_every: int
    max_pending_uploads: int
    max_pending_downloads: int
    upload_lease_s: float
    poll_s: float

    @classmethod
    def check(
        cls,
        *,
        workers: Iterable[str],
        total: int,
        min_workers: int | None,
        round_timeout_s: float,
        quorum_timeout_s: float | None,
        eval_every: int,
        checkpoint_every: int,
        max_pending_uploads: int,
        max_pending_downloads: int,
        upload_lease_s: float,
        poll_s: float,
    ) -> ServerSettings:
        names = tuple(dict.fromkeys(workers))
        if not names:
            raise UsageError("a parameter server needs at least one worker")
        counts = {
            "total": total,
            "eval_every": eval_every,
            "checkpoint_every": checkpoint_every,
            "max_pending_uploads": max_pending_uploads,
            "max_pending_downloads": max_pending_downloads,
        }
        for name, value in counts.items():
            if not is_int(value) or value < 1:
                raise UsageError(f"{name} must be an int >= 1, got {value!r}")
        quorum = len(names) if min_workers is None else min_workers
        if not is_int(quorum) or not 1 <= quorum <= len(names):
            raise UsageError(f"min_workers must be an int in [1, {len(names)}], got {min_workers!r}")
        seconds = {"round_timeout_s": round_timeout_s, "poll_s": poll_s, "upload_lease_s": upload_lease_s}
        if quorum_timeout_s is not None:
            seconds["quorum_timeout_s"] = quorum_timeout_s
        for name, duration in seconds.items():
            if not is_number(duration) or not duration > 0:
                raise UsageError(f"{name} must be > 0, got {duration!r}")
        return cls(
            workers=names,
            total=total,
            min_workers=quorum,
            round_timeout_s=float(round_timeout_s),
            quorum_timeout_s=10 * float(round_timeout_s) if quorum_timeout_s is None else float(quorum_timeout_s),
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            max_pending_uploads=max_pending_uploads,
            max_pending_downloads=max_pending_downloads,
            upload_lease_s=float(upload_lease_s),
            poll_s=float(poll_s),
        )
