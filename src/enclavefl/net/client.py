"""The attested client: probe and verify the server, pin its certificate, get admitted, call.

Connection errors surface as typed TransportErrors after bounded retries with exponential
backoff. A refused session (expired) or a broken connection (the server restarted, maybe
with a new identity that satisfies the policy) makes the client probe, verify and attest
again, transparently. Calls are retried after such failures: handlers must tolerate a
repeated request (hfl/vfl deduplicate by step or iteration).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from enclavefl.errors import Rejected, UsageError
from enclavefl.net import enclavefl_pb2 as pb
from enclavefl.net import enclavefl_pb2_grpc as pb_grpc
from enclavefl.net import exchange
from enclavefl.net.admission import PartyCredentials, Peer, build_admission, check_party_binding
from enclavefl.net.errors import CallFailed, ConnectFailed, HandshakeFailed, PartyNameHeld, PeerRefused
from enclavefl.net.probe import ProbedCertificate, fetch_certificate, verify_server_certificate
from enclavefl.net.server import SESSION_METADATA_KEY
from enclavefl.net.tensors import DEFAULT_CHUNK_SIZE, PROTOCOL_VERSION, Limits, Message, TensorSink

__all__ = [
    "AttestedClient",
    "RetryPolicy",
    "pinned_channel",
    "split_target",
]

log = logging.getLogger("enclavefl.net")

# Refresh a session a little before the server would refuse it.
_SESSION_MARGIN = 0.9
_RETRIED_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: `max_attempts` tries, sleeping initial, initial*multiplier, ... between."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or self.multiplier < 1:
            raise UsageError(f"invalid retry policy {self}")

    def backoffs(self) -> Iterator[float]:
        delay = self.initial_backoff_s
        while True:
            yield min(delay, self.max_backoff_s)
            delay *= self.multiplier


def split_target(target: str) -> tuple[str, int]:
    """'host:port' or '[v6addr]:port' -> (host, port); UsageError for anything else."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"expected HOST:PORT (port 1-65535), got {target!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def pinned_channel(target: str, probed: ProbedCertificate, options: list[tuple[str, Any]]) -> grpc.Channel:
    """A gRPC channel whose only trusted root is exactly the probed certificate."""
    credentials = grpc.ssl_channel_credentials(root_certificates=probed.pem)
    return grpc.secure_channel(
        target, credentials, options=[*options, ("grpc.ssl_target_name_override", probed.common_name)]
    )


def _transport_error(target: str, step: str, error: grpc.RpcError) -> Exception:
    details = error.details() or ""
    text = f"{step} with {target} failed: {error.code().name}: {details}"
    if error.code() is grpc.StatusCode.UNAVAILABLE and any(
        word in details.lower() for word in ("handshake", "ssl", "certificate")
    ):
        return HandshakeFailed(f"{text} (the server no longer shows the certificate that was verified)")
    if error.code() is grpc.StatusCode.PERMISSION_DENIED and exchange.rpc_error_check(error) == "party-name-held":
        return PartyNameHeld(f"{step} with {target}: {details}")
    if error.code() is grpc.StatusCode.PERMISSION_DENIED:
        return PeerRefused(f"{step}: refused by {target}: {details}", check=exchange.rpc_error_check(error))
    if error.code() is grpc.StatusCode.INVALID_ARGUMENT:
        return UsageError(f"{step}: {target} rejected the request as malformed: {details}")
    return ConnectFailed(text)


@dataclass
class _Connection:
    channel: grpc.Channel
    token: bytes
    refresh_at: float
    server: Peer
    probed: ProbedCertificate
    in_flight: int = 0
    retired: bool = False  # replaced: closed once its in-flight calls are done


class AttestedClient:
    """A party's attested connection to one server (`target` is HOST:PORT).

    The credentials' mode as on the server; in mode "client" the server's evidence is not
    verified but the certificate probed is still pinned; in mode "server" this client
    sends no evidence.
    """

    def __init__(
        self,
        target: str,
        credentials: PartyCredentials,
        *,
        retry: RetryPolicy = RetryPolicy(),
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        limits: Limits = Limits(),
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.target = target
        self._host, self._port = split_target(target)
        self.mode = credentials.mode
        if self.mode.verifies_client and credentials.identity is None:
            raise UsageError(f"mode {self.mode.value} attests this client: an RA-TLS identity is required")
        self._identity = credentials.identity if self.mode.verifies_client else None
        self._policy = credentials.policy
        self.party = credentials.party
        self._job_id = credentials.job_id
        self._collateral = credentials.collateral
        self._at = credentials.at
        self._retry = retry
        self._chunk_size = chunk_size
        self._limits = limits
        self._connect_timeout_s = connect_timeout_s
        self._options = exchange.channel_options(chunk_size, limits)
        self._lock = threading.Lock()
        self._connection: _Connection | None = None
        self._last_certificate: bytes | None = None  # SHA-256 of the last pinned certificate

    # --- connection -------------------------------------------------------------------

    def connect(self) -> Peer:
        """Probe, verify and get admitted now (calls do it lazily); returns the server peer."""
        connection = self._acquire()
        self._release(connection)
        return connection.server

    @property
    def server(self) -> Peer | None:
        """The server of the live connection, or None when there is none."""
        connection = self._connection
        return connection.server if connection else None

    def _acquire(self) -> _Connection:
        """The live connection (established first if needed), counted as in use."""
        with self._lock:
            connection = self._connection
            if connection is None or time.monotonic() >= connection.refresh_at:
                if connection is not None:
                    self._retire(connection)
                connection = self._connection = self._establish()
            connection.in_flight += 1
            return connection

    def _release(self, connection: _Connection) -> None:
        with self._lock:
            connection.in_flight -= 1
            if connection.retired and connection.in_flight == 0:
                connection.channel.close()

    def _retire(self, connection: _Connection) -> None:
        # Other threads' calls may still run on it: close it when the last one is done.
        if self._connection is connection:
            self._connection = None
        if not connection.retired:
            connection.retired = True
            if connection.in_flight == 0:
                connection.channel.close()

    def _drop(self, connection: _Connection) -> None:
        with self._lock:
            self._retire(connection)

    def _establish(self) -> _Connection:
        probed = fetch_certificate(self._host, self._port, timeout_s=self._connect_timeout_s)
        if self.mode.verifies_server:
            claims = verify_server_certificate(
                probed, policy=self._policy, collateral=self._collateral, at=self._at, who=self.target
            )
        else:
            claims = None
            log.warning(
                "INSECURE: server %s not attested (mode %s); its certificate is only pinned",
                self.target,
                self.mode.value,
            )
        channel = pinned_channel(self.target, probed, self._options)
        try:
            answer = self._admit(pb_grpc.AdmissionStub(channel), probed)
        except grpc.RpcError as exc:
            channel.close()
            raise _transport_error(self.target, "admission", exc) from None
        except BaseException:
            channel.close()
            raise
        if claims is not None:
            try:
                check_party_binding(claims, answer.server_party, self._policy, f"server {self.target}", required=False)
            except Rejected:
                channel.close()
                raise
        server = Peer(answer.server_party, claims)
        if self._last_certificate not in (None, probed.sha256):
            log.info("%s shows a new certificate (restarted?); it was verified and pinned", self.target)
        self._last_certificate = probed.sha256
        log.info("party %s admitted by %s (party %s)", self.party, self.target, server.party)
        return _Connection(
            channel=channel,
            token=answer.session_token,
            refresh_at=time.monotonic() + answer.expires_in_s * _SESSION_MARGIN,
            server=server,
            probed=probed,
        )

    def _admit(self, admission: pb_grpc.AdmissionStub, probed: ProbedCertificate) -> pb.AdmitResponse:
        # A server under a nonce flood may drop ours before we use it: one retry with a
        # fresh nonce (a nonce refused again is a real refusal).
        for attempt in (1, 2):
            nonce = admission.GetNonce(pb.NonceRequest(version=PROTOCOL_VERSION), timeout=self._connect_timeout_s)
            request = build_admission(
                self._identity, nonce=nonce.nonce, server_cert_der=probed.der, job_id=self._job_id, party=self.party
            )
            try:
                answer: pb.AdmitResponse = admission.Admit(request.to_proto(), timeout=self._connect_timeout_s)
                return answer
            except grpc.RpcError as exc:
                nonce_refused = (
                    exc.code() is grpc.StatusCode.PERMISSION_DENIED and exchange.rpc_error_check(exc) == "nonce"
                )
                if attempt == 2 or not nonce_refused:
                    raise
                log.info(
                    "%s refused our admission nonce (%s); retrying once with a fresh one", self.target, exc.details()
                )
        raise AssertionError("unreachable")

    # --- calls --------------------------------------------------------------------------

    def call(
        self, method: str, message: Message, *, sink: TensorSink | None = None, timeout_s: float | None = None
    ) -> Message:
        """Send `message` to the server's handler for `method`; returns its response.

        Retries (re-attesting first) when the session was refused or the connection broke.
        Raises PeerRefused when the server refuses us or the request, CallFailed or
        ConnectFailed/HandshakeFailed when retries are exhausted.
        """
        last: ConnectFailed | HandshakeFailed | CallFailed | None = None
        backoffs = self._retry.backoffs()
        for attempt in range(1, self._retry.max_attempts + 1):
            if attempt > 1:
                time.sleep(next(backoffs))
            try:
                connection = self._acquire()
            except (ConnectFailed, HandshakeFailed) as exc:
                log.info(
                    "connecting to %s failed (attempt %d of %d): %s",
                    self.target,
                    attempt,
                    self._retry.max_attempts,
                    exc.reason,
                )
                last = exc
                continue
            try:
                return exchange.call(
                    exchange.exchange_callable(connection.channel),
                    method,
                    message,
                    metadata=((SESSION_METADATA_KEY, connection.token),),
                    chunk_size=self._chunk_size,
                    sink=sink,
                    limits=self._limits,
                    timeout=timeout_s,
                )
            except grpc.RpcError as exc:
                code = exc.code()
                failure = CallFailed(f"{method} on {self.target}: {code.name}: {exc.details()}", code=code.name)
                # RESOURCE_EXHAUSTED: the server refused the call before running it (too many
                # calls in progress), so sending it again is safe.
                if code not in _RETRIED_CODES:
                    raise failure from None
                busy = code is grpc.StatusCode.RESOURCE_EXHAUSTED
                log.info(
                    "%s on %s: %s (%s); %s (attempt %d of %d)",
                    method,
                    self.target,
                    code.name,
                    exc.details(),
                    "retrying" if busy else "attesting again",
                    attempt,
                    self._retry.max_attempts,
                )
                if not busy:
                    self._drop(connection)
                last = failure
            finally:
                self._release(connection)
        assert last is not None  # max_attempts >= 1
        reason = f"{last.reason} (gave up after {self._retry.max_attempts} attempts)"
        if isinstance(last, CallFailed):
            raise CallFailed(reason, code=last.code) from None
        raise type(last)(reason) from None

    def health(self) -> pb.HealthResponse:
        """The server's readiness report (one attempt)."""
        connection = self._acquire()
        try:
            return pb_grpc.HealthStub(connection.channel).Check(  # type: ignore[no-any-return]
                pb.HealthRequest(version=PROTOCOL_VERSION), timeout=self._connect_timeout_s
            )
        except grpc.RpcError as exc:
            self._drop(connection)
            raise _transport_error(self.target, "health check", exc) from None
        finally:
            self._release(connection)

    def wait_ready(self, timeout_s: float = 60.0) -> pb.HealthResponse:
        """Wait until the server is up, attested and reports ready (instead of sleeping).

        Attestation refusals are raised at once; unreachable or not-ready servers are polled
        with backoff until `timeout_s`, then ConnectFailed.
        """
        deadline = time.monotonic() + timeout_s
        backoffs = self._retry.backoffs()
        last = "not tried"
        while True:
            try:
                answer = self.health()
                if answer.ready:
                    return answer
                last = f"party {answer.party} reports not ready"
            except (ConnectFailed, HandshakeFailed) as exc:
                last = exc.reason
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectFailed(f"{self.target} not ready after {timeout_s:g} s: {last}")
            time.sleep(min(next(backoffs), remaining))

    def close(self) -> None:
        """Forget the session; the channel closes once calls still running on it are done."""
        with self._lock:
            if self._connection is not None:
                self._retire(self._connection)

    def __enter__(self) -> AttestedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
