"""Typed errors of the attested channel (all subclasses of enclavefl.errors)."""

from __future__ import annotations

from enclavefl.errors import Rejected, TransportError

__all__ = [
    "CallFailed",
    "ConnectFailed",
    "HandshakeFailed",
    "PartyNameHeld",
    "PeerRefused",
]


class ConnectFailed(TransportError):
    """The peer could not be reached (refused, timed out, reset) after the allowed retries."""


class HandshakeFailed(TransportError):
    """The TLS handshake failed: the server no longer shows the certificate we verified."""


class CallFailed(TransportError):
    """An RPC broke after the allowed retries; `code` is the gRPC status name."""

    def __init__(self, reason: str, *, code: str = "UNKNOWN") -> None:
        super().__init__(reason)
        self.code = code


class PeerRefused(Rejected):
    """The remote party refused us or our request; `check` is the check it named."""


class PartyNameHeld(ConnectFailed):
    """The server refused our party name for now: another attested key holds it and was
    active recently. Transient (a restarted party waits out its old session), so retried."""
