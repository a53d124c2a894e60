"""Readiness of a listening party (server or leader), for container health checks.

`check_health` reads the party's RA-TLS certificate, pins exactly that certificate and asks
the Health RPC, which the server answers without a session: no admission, so a probe from
the host (a compose or Kubernetes health check, outside any enclave) needs no evidence of
its own. Given a policy it also verifies the party's evidence, as a peer would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import grpc

from enclavefl.net import enclavefl_pb2 as pb
from enclavefl.net import enclavefl_pb2_grpc as pb_grpc
from enclavefl.net.client import RetryPolicy, pinned_channel, split_target
from enclavefl.net.errors import ConnectFailed
from enclavefl.net.probe import fetch_certificate, verify_server_certificate
from enclavefl.net.tensors import PROTOCOL_VERSION
from enclavefl.tee.claims import Claims
from enclavefl.tee.policy import Policy

__all__ = ["Health", "check_health", "wait_healthy"]

# Between probes while waiting: 0.2 s, doubling up to 5 s.
_WAIT_BACKOFF = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=5.0)


@dataclass(frozen=True)
class Health:
    """What a party said about itself at one probe."""

    target: str
    ready: bool
    party: str
    methods: tuple[str, ...]
    protocol_version: int
    claims: Claims | None = None
    """The party's verified claims, when probed with a policy."""

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ready": self.ready,
            "party": self.party,
            "methods": list(self.methods),
            "protocol_version": self.protocol_version,
            "attested": self.claims is not None,
            "tee": self.claims.tee.value if self.claims is not None else None,
            "mr_enclave": self.claims.mr_enclave.hex() if self.claims is not None else None,
        }


def check_health(
    target: str,
    *,
    policy: Policy | None = None,
    collateral: Any = None,
    at: int | None = None,
    timeout_s: float = 5.0,
) -> Health:
    """Ask the party listening at `target` (HOST:PORT) whether it is ready; one attempt.

    Raises ConnectFailed when nothing answers there (or not with gRPC over TLS), and with a
    `policy`, Rejected when the party's evidence does not satisfy it (and it must carry the
    policy-hash claim of that same policy, as every enclavefl party does).
    """
    host, port = split_target(target)
    probed = fetch_certificate(host, port, timeout_s=timeout_s)
    claims = None
    if policy is not None:
        claims = verify_server_certificate(probed, policy=policy, collateral=collateral, at=at, who=target)
    channel = pinned_channel(target, probed, [])
    try:
        answer = pb_grpc.HealthStub(channel).Check(pb.HealthRequest(version=PROTOCOL_VERSION), timeout=timeout_s)
    except grpc.RpcError as exc:
        raise ConnectFailed(f"health check of {target} failed: {exc.code().name}: {exc.details()}") from None
    finally:
        channel.close()
    return Health(
        target=target,
        ready=answer.ready,
        party=answer.party,
        methods=tuple(answer.methods),
        protocol_version=answer.version,
        claims=claims,
    )


def wait_healthy(
    target: str,
    *,
    timeout_s: float,
    policy: Policy | None = None,
    collateral: Any = None,
    at: int | None = None,
    retry: RetryPolicy | None = None,
) -> Health:
    """Probe `target` until it reports ready (a Kubernetes init container, a script), never sleeping blind.

    Unreachable or not-ready parties are probed again with exponential backoff until
    `timeout_s`, then ConnectFailed names the last answer. A policy refusal is raised at once:
    waiting does not make evidence acceptable.
    """
    deadline = time.monotonic() + timeout_s
    backoffs = (retry or _WAIT_BACKOFF).backoffs()
    while True:
        try:
            health = check_health(target, policy=policy, collateral=collateral, at=at)
            if health.ready:
                return health
            last = f"party {health.party} reports not ready"
        except ConnectFailed as exc:
            last = exc.reason
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectFailed(f"{target} not ready after {timeout_s:g} s: {last}")
        time.sleep(min(next(backoffs), remaining))
