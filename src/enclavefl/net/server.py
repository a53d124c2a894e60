"""The attested server: a gRPC secure port with the party's RA-TLS certificate.

Admission and health RPCs are open; every other RPC must carry a live session token,
checked by one interceptor. Handlers see only a `Peer` (party name + verified claims).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from enclavefl.errors import Check, Rejected, UsageError
from enclavefl.net import enclavefl_pb2 as pb
from enclavefl.net.admission import AdmissionRequest, Admitter, NonceStore, PartyCredentials, Peer, SessionStore
from enclavefl.net.guard import OpenCallGuard, OpenLimits, source_of
from enclavefl.net.exchange import ExchangeServicer, Handler, Router, abort, channel_options
from enclavefl.net.tensors import DEFAULT_CHUNK_SIZE, PROTOCOL_VERSION, Limits, TensorSink

__all__ = [
    "SESSION_METADATA_KEY",
    "AttestedServer",
    "session_token",
]

log = logging.getLogger("enclavefl.net")

SESSION_METADATA_KEY = "enclavefl-session-bin"
_OPEN_SERVICES = ("/enclavefl.v1.Admission/", "/enclavefl.v1.Health/")


def session_token(metadata: Any) -> bytes | None:
    for key, value in metadata or ():
        if key == SESSION_METADATA_KEY:
            return value if isinstance(value, bytes) else None
    return None


def _denying_handler(handler: grpc.RpcMethodHandler | None, reason: str) -> grpc.RpcMethodHandler:
    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, grpc.StatusCode.UNAUTHENTICATED, reason, Check.SESSION)

    if handler is None or not handler.request_streaming:
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.stream_unary_rpc_method_handler(deny)


class _SessionInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Admits an RPC only with a live session token (admission and health aside)."""

    def __init__(self, sessions: SessionStore) -> None:
        self._sessions = sessions

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(_OPEN_SERVICES):
            return continuation(details)
        token = session_token(details.invocation_metadata)
        try:
            if token is None:
                raise Rejected("no session token: attest first (Admission service)", check=Check.SESSION)
            self._sessions.lookup(token)
        except Rejected as exc:
            log.info("refused %s: %s", details.method, exc.reason)
            return _denying_handler(continuation(details), exc.reason)
        return continuation(details)


class _AdmissionServicer:
    def __init__(self, admitter: Admitter, nonces: NonceStore, sessions: SessionStore, party: str) -> None:
        self._admitter = admitter
        self._nonces = nonces
        self._sessions = sessions
        self._party = party

    def GetNonce(self, request: pb.NonceRequest, context: grpc.ServicerContext) -> pb.NonceResponse:
        try:
            nonce = self._nonces.issue(source_of(context.peer()))
        except Rejected as exc:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, exc.reason, exc.check)
        return pb.NonceResponse(version=PROTOCOL_VERSION, nonce=nonce, expires_in_s=self._nonces.ttl_s)

    def Admit(self, request: pb.AdmitRequest, context: grpc.ServicerContext) -> pb.AdmitResponse:
        if request.version != PROTOCOL_VERSION:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"admission version {request.version} not supported")
        try:
            _, token = self._admitter.admit(AdmissionRequest.from_proto(request))
        except Rejected as exc:
            log.warning("refused admission of party %r from %s: %s", request.party[:128], context.peer(), exc.reason)
            abort(context, grpc.StatusCode.PERMISSION_DENIED, exc.reason, exc.check)
        except UsageError as exc:
            log.warning("malformed admission from party %r (%s): %s", request.party[:128], context.peer(), exc.reason)
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc.reason, Check.FORMAT)
        return pb.AdmitResponse(
            version=PROTOCOL_VERSION, session_token=token, expires_in_s=self._sessions.ttl_s, server_party=self._party
        )


class _HealthServicer:
    def __init__(self, server: AttestedServer) -> None:
        self._server = server

    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(
            version=PROTOCOL_VERSION,
            ready=self._server.ready,
            party=self._server.party,
            methods=self._server.methods(),
        )


class AttestedServer:
    """A party's attested gRPC server. Register handlers, then `start()`.

    The credentials' mode: "two-way" (default) attests clients and is attested by them;
    "server" admits clients without evidence; "client" attests clients only. Sessions
    last `session_ttl_s`, nonces `nonce_ttl_s`, both measured on `clock`; a party name stays
    with the attested key that holds it while that key was active within `session_hold_s`.
    Open services (admission, health) are bounded by `open_limits` (see guard.py).
    """

    def __init__(
        self,
        credentials: PartyCredentials,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        session_ttl_s: float = 600.0,
        session_hold_s: float = 10.0,
        nonce_ttl_s: float = 30.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        limits: Limits = Limits(),
        max_workers: int = 16,
        max_concurrent_rpcs: int = 1024,
        open_limits: OpenLimits = OpenLimits(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if credentials.identity is None:
            raise UsageError("a server needs an RA-TLS identity (PartyCredentials.identity)")
        self.party = credentials.party
        self.mode = credentials.mode
        self._identity = credentials.identity
        self._host = host
        self._requested_port = port
        self._router = Router()
        self._ready = threading.Event()
        self._nonces = NonceStore(ttl_s=nonce_ttl_s, clock=clock)
        self._sessions = SessionStore(ttl_s=session_ttl_s, hold_s=session_hold_s, clock=clock)
        admitter = Admitter(credentials, nonces=self._nonces, sessions=self._sessions)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"enclavefl-{self.party}"),
            interceptors=[_SessionInterceptor(self._sessions)],
            # gRPC shares a port between servers by default: a second party on a busy port
            # must fail to start, not split the first one's connections.
            options=[*channel_options(chunk_size, limits), ("grpc.so_reuseport", 0)],
            # Beyond this many calls in progress gRPC refuses new ones before they queue.
            maximum_concurrent_rpcs=max_concurrent_rpcs,
        )
        # Admission and health are open to anyone: their own threads and limits (guard.py).
        self._guard = OpenCallGuard(open_limits, name=f"enclavefl-{self.party}")
        self._add_open_services(_AdmissionServicer(admitter, self._nonces, self._sessions, self.party))
        ExchangeServicer(self._router, self._peer_of, chunk_size=chunk_size, limits=limits).add_to_server(self._server)
        self.port = 0

    def _add_open_services(self, admission: _AdmissionServicer) -> None:
        guard = self._guard
        health = _HealthServicer(self)
        services = {
            "enclavefl.v1.Admission": {
                "GetNonce": guard.handler(
                    "GetNonce", admission.GetNonce, pb.NonceRequest, pb.NonceResponse.SerializeToString
                ),
                "Admit": guard.handler("Admit", admission.Admit, pb.AdmitRequest, pb.AdmitResponse.SerializeToString),
            },
            "enclavefl.v1.Health": {
                "Check": guard.handler("Check", health.Check, pb.HealthRequest, pb.HealthResponse.SerializeToString),
            },
        }
        self._server.add_generic_rpc_handlers(
            tuple(grpc.method_handlers_generic_handler(name, handlers) for name, handlers in services.items())
        )

    def register(self, method: str, handler: Handler, *, sink: TensorSink | None = None) -> None:
        """Serve `method` with `handler(peer, request) -> response`; request tensors go to `sink`."""
        self._router.register(method, handler, sink=sink)

    def admitted(self) -> dict[str, Peer]:
        """The parties admitted so far and their verified claims (for run summaries)."""
        return self._sessions.admitted()

    def methods(self) -> list[str]:
        return self._router.methods()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def set_ready(self, ready: bool) -> None:
        """Readiness as reported by the Health RPC (true once started, unless set otherwise)."""
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    def start(self, *, ready: bool = True) -> int:
        """Bind and start serving; returns the port (useful with port=0)."""
        credentials = grpc.ssl_server_credentials([(self._identity.key_pem(), self._identity.cert_pem)])
        try:
            self.port = self._server.add_secure_port(f"{self._host}:{self._requested_port}", credentials)
        except RuntimeError as exc:
            raise UsageError(f"cannot listen on {self._host}:{self._requested_port}: {exc}") from exc
        if self.port == 0:
            raise UsageError(f"cannot listen on {self._host}:{self._requested_port}")
        self._server.start()
        self.set_ready(ready)
        log.info(
            "party %s serving on %s:%d (mode %s, methods %s)",
            self.party,
            self._host,
            self.port,
            self.mode.value,
            self.methods(),
        )
        return self.port

    def stop(self, grace_s: float | None = 1.0) -> None:
        self._ready.clear()
        self._server.stop(grace_s).wait()
        self._guard.close()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops (or `timeout_s` passes); True if it stopped."""
        return bool(self._server.wait_for_termination(timeout_s))

    def __enter__(self) -> AttestedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _peer_of(self, context: grpc.ServicerContext) -> Peer:
        token = session_token(context.invocation_metadata())
        try:
            if token is None:
                raise Rejected("no session token: attest first (Admission service)", check=Check.SESSION)
            peer = self._sessions.begin(token)
        except Rejected as exc:
            # Expired (or ended: its name passed to another key) between the interceptor and here.
            abort(context, grpc.StatusCode.UNAUTHENTICATED, exc.reason, Check.SESSION)
        # The call counts as the session's activity (it holds the party name) until it ends.
        if not context.add_callback(lambda: self._sessions.end(token)):
            self._sessions.end(token)
        return peer
