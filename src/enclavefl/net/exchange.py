"""The generic call: a streamed Message in, a streamed Message out, dispatched by method name.

Security-neutral on purpose: the attested server and client wrap it, and the benchmark
runs the very same code over a plain channel to measure what attestation and TLS cost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from enclavefl.errors import Check, EnclaveflError, FormatError, Rejected, UsageError
from enclavefl.net import enclavefl_pb2 as pb
from enclavefl.net.admission import Peer
from enclavefl.net.errors import CallFailed, PeerRefused
from enclavefl.net.tensors import (
    DEFAULT_CHUNK_SIZE,
    Frame,
    Limits,
    Message,
    TensorSink,
    decode_message,
    encode_message,
    parse_frame,
    serialize_frame,
)

log = logging.getLogger("enclavefl.net")

Handler = Callable[[Peer, Message], Message]
SERVICE = "enclavefl.v1.Exchange"
CALL_METHOD = f"/{SERVICE}/Call"
CHECK_METADATA_KEY = "enclavefl-check"
# Room for the frame's own fields around a chunk's bytes.
_FRAME_OVERHEAD = 64 << 10
# A connection whose peer vanished without closing it (pulled cable, crashed host) fails
# its calls after about KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS, so callers reconnect,
# instead of hanging until TCP's retransmissions give up (minutes) or the call deadline.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 10_000


def channel_options(chunk_size: int, limits: Limits) -> list[tuple[str, Any]]:
    """gRPC options for both ends: messages up to one chunk (or the meta limit) plus framing,
    and keepalive pings while calls are open (the server accepts them at that rate)."""
    max_message = max(chunk_size, limits.max_meta_bytes) + _FRAME_OVERHEAD
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Long-polls send nothing for a while: keep pinging, and let the server allow it.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ]


@dataclass(frozen=True)
class _Route:
    handler: Handler
    sink: TensorSink | None


class Router:
    """Method name -> handler (and the sink its request tensors go to)."""

    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}
        self._lock = threading.Lock()

    def register(self, method: str, handler: Handler, *, sink: TensorSink | None = None) -> None:
        if not method or not isinstance(method, str):
            raise UsageError(f"method name must be a non-empty string, got {method!r}")
        with self._lock:
            if method in self._routes:
                raise UsageError(f"a handler for method {method!r} is already registered")
            self._routes[method] = _Route(handler, sink)

    def methods(self) -> list[str]:
        with self._lock:
            return sorted(self._routes)

    def route(self, method: str) -> _Route | None:
        with self._lock:
            return self._routes.get(method)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, check: Check | None = None) -> NoReturn:
    """End the RPC with `reason`; `check` travels in trailing metadata for typed errors."""
    if check is not None:
        context.set_trailing_metadata(((CHECK_METADATA_KEY, check.value),))
    context.abort(code, reason)
    raise AssertionError("grpc's context.abort returns only by raising")


class ExchangeServicer:
    """Runs registered handlers. `peer_of` tells who is calling (or aborts the RPC).

    Registered with the frame codec of `tensors` instead of the generated servicer (same
    wire format as enclavefl.proto's Exchange service, without upb's slow large-bytes path).
    """

    def __init__(
        self,
        router: Router,
        peer_of: Callable[[grpc.ServicerContext], Peer],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        limits: Limits = Limits(),
    ) -> None:
        self._router = router
        self._peer_of = peer_of
        self._chunk_size = chunk_size
        self._limits = limits

    def add_to_server(self, server: grpc.Server) -> None:
        handler = grpc.stream_stream_rpc_method_handler(
            self.Call, request_deserializer=parse_frame, response_serializer=serialize_frame
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Call": handler}),))

    def Call(self, request_iterator: Iterator[Frame], context: grpc.ServicerContext) -> Iterator[Frame]:
        peer = self._peer_of(context)
        frames = iter(request_iterator)
        try:
            first = next(frames, None)
        except grpc.RpcError:
            log.info("party %s cancelled a call before sending it", peer.party)
            return
        header, route = self._route(first, context)
        method = header.header.method
        request = self._receive(_prepend(header, frames), method, route, peer, context)
        if request is None:
            return
        response = _run_handler(route, peer, method, request, context)
        yield from self._encode(response, method, context)

    def _route(self, first: Frame | None, context: grpc.ServicerContext) -> tuple[pb.Frame, _Route]:
        """The call header and the route registered for the method it names (else the RPC ends)."""
        if not isinstance(first, pb.Frame) or first.WhichOneof("kind") != "header":
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "request must start with a call header", Check.FORMAT)
        method = first.header.method
        route = self._router.route(method)
        if route is None:
            abort(
                context,
                grpc.StatusCode.UNIMPLEMENTED,
                f"no handler for method {method!r}; registered: {self._router.methods()}",
            )
        return first, route

    def _receive(
        self, frames: Iterator[Frame], method: str, route: _Route, peer: Peer, context: grpc.ServicerContext
    ) -> Message | None:
        """The request, decoded into the route's sink; None when the caller cancelled it."""
        try:
            _, request = decode_message(frames, sink=route.sink, limits=self._limits)
        except grpc.RpcError:
            log.info("party %s cancelled %s while sending it", peer.party, method)
            return None
        except UsageError as exc:
            log.warning("malformed %s request from party %s: %s", method, peer.party, exc.reason)
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc.reason, Check.FORMAT)
        except Exception:  # e.g. the sink's disk is full
            log.exception("receiving %s from party %s failed", method, peer.party)
            abort(context, grpc.StatusCode.INTERNAL, f"receiving {method!r} failed on the server")
        return request

    def _encode(self, response: Any, method: str, context: grpc.ServicerContext) -> Iterator[Frame]:
        """The handler's response as frames (a response that cannot be sent ends the RPC)."""
        try:
            if not isinstance(response, Message):
                raise UsageError(f"handler returned {type(response).__name__}, not Message")
            return encode_message(response, chunk_size=self._chunk_size)
        except UsageError as exc:
            log.error("handler for %s returned a response that cannot be sent: %s", method, exc.reason)
            abort(context, grpc.StatusCode.INTERNAL, f"handler for {method!r} failed on the server")


def _run_handler(route: _Route, peer: Peer, method: str, request: Message, context: grpc.ServicerContext) -> Any:
    """The route's handler on the request; a refusal, bad input or failure ends the RPC with
    its status (our bugs' details stay in our log, never on the wire)."""
    try:
        return route.handler(peer, request)
    except Rejected as exc:
        log.warning("refused %s from party %s: %s", method, peer.party, exc.reason)
        abort(context, grpc.StatusCode.PERMISSION_DENIED, exc.reason, exc.check)
    except UsageError as exc:
        log.warning("malformed %s request from party %s: %s", method, peer.party, exc.reason)
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc.reason, Check.FORMAT)
    except EnclaveflError as exc:  # a known failure of this party: its reason, no traceback
        log.error("handler for %s failed (caller: party %s): %s", method, peer.party, exc.reason)
        abort(context, grpc.StatusCode.INTERNAL, f"handler for {method!r} failed on the server")
    except Exception:
        # Our bug or the handler's: keep the details in our log, not on the wire.
        log.exception("handler for %s failed (caller: party %s)", method, peer.party)
        abort(context, grpc.StatusCode.INTERNAL, f"handler for {method!r} failed on the server")


def _prepend(first: Frame, rest: Iterator[Frame]) -> Iterator[Frame]:
    yield first
    yield from rest


class _Recording:
    """Request frames for gRPC; remembers an exception so the caller sees it, not CANCELLED."""

    def __init__(self, frames: Iterator[Frame]) -> None:
        self._frames = frames
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[Frame]:
        try:
            yield from self._frames
        except Exception as exc:  # not GeneratorExit: gRPC closes the iterator on failures
            self.error = exc
            raise


def rpc_error_check(error: grpc.RpcError) -> Check:
    """The check a peer named in its refusal (UNSPECIFIED when none, or one this version does not know)."""
    for key, value in error.trailing_metadata() or ():
        if key == CHECK_METADATA_KEY:
            return Check.from_wire(str(value))
    return Check.UNSPECIFIED


def exchange_callable(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """The Exchange/Call RPC on `channel`, with the fast frame codec."""
    return channel.stream_stream(CALL_METHOD, request_serializer=serialize_frame, response_deserializer=parse_frame)


def call(
    rpc: grpc.StreamStreamMultiCallable,
    method: str,
    message: Message,
    *,
    metadata: tuple[tuple[str, Any], ...] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sink: TensorSink | None = None,
    limits: Limits = Limits(),
    timeout: float | None = None,
) -> Message:
    """One exchange; gRPC errors other than the typed ones below propagate as grpc.RpcError.

    PERMISSION_DENIED -> PeerRefused, INVALID_ARGUMENT -> UsageError, UNIMPLEMENTED and
    INTERNAL -> CallFailed; an error producing the request is re-raised as itself.
    """
    request = _Recording(encode_message(message, method=method, chunk_size=chunk_size))
    responses = rpc(iter(request), metadata=metadata, timeout=timeout)
    try:
        _, response = decode_message(responses, sink=sink, limits=limits)
    except FormatError:
        responses.cancel()
        raise
    except grpc.RpcError as exc:
        if request.error is not None:
            raise request.error from None
        code = exc.code()
        if code is grpc.StatusCode.PERMISSION_DENIED:
            raise PeerRefused(f"{method}: refused by the peer: {exc.details()}", check=rpc_error_check(exc)) from None
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            raise UsageError(f"{method}: the peer rejected the request as malformed: {exc.details()}") from None
        if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL):
            raise CallFailed(f"{method}: {code.name}: {exc.details()}", code=code.name) from None
        raise
    return response
