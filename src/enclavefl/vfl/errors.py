"""Typed errors of vertical FL (subclasses of enclavefl.errors)."""

from __future__ import annotations

from collections.abc import Iterable

from enclavefl.errors import TransportError, UsageError


class FollowerUnavailable(TransportError):
    """Followers did not join, or stopped answering, within the bounded wait.

    Vertical FL cannot go on without a follower's columns, so the leader stops. A
    follower refused at admission (attestation, policy) never joins and ends here too.
    `parties` names the followers that were missing.
    """

    def __init__(self, reason: str, *, parties: Iterable[str]) -> None:
        super().__init__(reason)
        self.parties = tuple(parties)


class LeaderUnreachable(TransportError):
    """A follower could not reach the leader again within its reconnect window."""


class ResumeFailed(UsageError):
    """The parties hold no common state to resume from, or a checkpoint does not fit the job."""
