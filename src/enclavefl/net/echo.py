"""A minimal attested round trip: for the demo, deployment checks and benchmarks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from enclavefl.errors import TransportError, UsageError
from enclavefl.net.admission import PartyCredentials, Peer
from enclavefl.net.client import AttestedClient
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import Message

ECHO_METHOD = "echo"
ECHO_JOB = "enclavefl-echo"


def _echo(peer: Peer, request: Message) -> Message:
    return Message(meta={**request.meta, "peer": peer.party}, tensors=request.tensors)


def start_echo_server(credentials: PartyCredentials, *, host: str = "127.0.0.1", port: int = 0) -> AttestedServer:
    """An attested server answering `echo` with the request itself; started, not blocking.
    Clients must use the same job id (ECHO_JOB by convention)."""
    server = AttestedServer(credentials, host=host, port=port)
    server.register(ECHO_METHOD, _echo)
    server.start()
    return server


def run_echo_server(credentials: PartyCredentials, *, host: str = "127.0.0.1", port: int = 0) -> None:
    """`start_echo_server`, then serve until the process is interrupted."""
    server = start_echo_server(credentials, host=host, port=port)
    try:
        server.wait()
    finally:
        server.stop()


@dataclass(frozen=True)
class EchoResult:
    """What an echo round trip showed: who the server is and how fast the channel was."""

    server: Peer
    megabytes: float
    setup_ms: float
    seconds: float

    @property
    def throughput_mb_s(self) -> float:
        """Payload megabytes moved per second, both directions counted."""
        return 2 * self.megabytes / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {
            "server_party": self.server.party,
            "server_claims": self.server.claims.to_json() if self.server.claims else None,
            "megabytes": self.megabytes,
            "setup_ms": round(self.setup_ms, 2),
            "seconds": round(self.seconds, 4),
            "throughput_mb_s": round(self.throughput_mb_s, 1),
        }


def run_echo_client(
    target: str, credentials: PartyCredentials, *, megabytes: float = 16.0, wait_s: float = 30.0
) -> EchoResult:
    """Wait for `target` (up to `wait_s`), attest it, echo `megabytes` (10**6 bytes) of
    random bytes through it, check they come back unchanged, and time it."""
    if megabytes < 0:
        raise UsageError(f"megabytes must be >= 0, got {megabytes}")
    payload = np.random.default_rng().integers(0, 256, int(megabytes * 1e6), dtype=np.uint8)
    with AttestedClient(target, credentials) as client:
        client.wait_ready(wait_s)
        client.close()  # time a fresh connection, not the one readiness polling left open
        start = time.perf_counter()
        server = client.connect()
        setup_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        answer = client.call(ECHO_METHOD, Message(meta={"party": credentials.party}, tensors={"payload": payload}))
        seconds = time.perf_counter() - start
    if not np.array_equal(answer.numpy("payload"), payload):
        raise TransportError(f"echo from {target} returned different bytes")
    return EchoResult(server=server, megabytes=payload.nbytes / 1e6, setup_ms=setup_ms, seconds=seconds)
