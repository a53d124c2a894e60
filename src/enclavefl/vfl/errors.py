"""Typed errors of vertical FL (subclasses of enclavefl.errors)."""

from __future__ import annotations

from collections.abc import Iterable

from enclavefl.errors import Check, Rejected, TransportError, UsageError

__all__ = ["FollowerRefused", "FollowerUnavailable", "LeaderUnreachable", "ResumeFailed"]


class FollowerUnavailable(TransportError):
    """Followers did not join, or stopped answering, within the bounded wait.

    Vertical FL cannot go on without a follower's columns, so the leader stops. A
    follower refused at admission (attestation, policy) never joins and ends here too.
    `parties` names the followers that were missing.
    """

    def __init__(self, reason: str, *, parties: Iterable[str]) -> None:
        super().__init__(reason)
        self.parties = tuple(parties)


class FollowerRefused(Rejected):
    """A follower refused this leader and told it why (exit 1); the leader stops at once.

    For example peer-based rollback protection: the leader resumed from an older checkpoint
    than it had told the follower it sealed. `party` is the follower, `check` the check it named.
    """

    def __init__(self, reason: str, *, party: str, check: Check | str) -> None:
        super().__init__(reason, check=check)
        self.party = party


class LeaderUnreachable(TransportError):
    """A follower could not reach the leader again within its reconnect window."""


class ResumeFailed(UsageError):
    """The parties hold no common state to resume from, or a checkpoint does not fit the job."""
