"""Limits on the services anyone may call before attesting (admission and health).

A peer that has not attested yet is untrusted, so what it can make the server hold is
bounded, the way gRPC servers facing the internet bound it:

* the open services run on their own thread pool, so however they are abused the threads
  of authenticated calls stay free (the server passes its own `maximum_concurrent_rpcs`
  to gRPC as well, which bounds what is queued);
* at most `max_calls` open calls run at once, and at most `max_calls_per_source` from one
  source (an IPv4 address, an IPv6 /64); others are refused at once (RESOURCE_EXHAUSTED),
  on gRPC's own serving thread, without a hand-off to a pool thread: under a flood most
  calls are refused, so a refusal must cost the server as little as possible;
* a call whose request message has not arrived `request_timeout_s` after it started is
  cancelled (a stalled client holds nothing for longer);
* a request larger than `max_request_bytes` or that does not parse is refused with one
  WARNING line naming the peer, not a traceback.

The handlers are registered as request-streaming on the server (the wire format of a unary
call is the same), because gRPC waits for a unary request inside the pool thread before any
application code runs, and that wait is what must be bounded.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import itertools
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from enclavefl.errors import UsageError
from enclavefl.net.tensors import Malformed

__all__ = ["OpenCallGuard", "OpenLimits", "source_of"]

log = logging.getLogger("enclavefl.net")

# One refusal line per source and reason per this many seconds (a flood must not flood the log).
_LOG_INTERVAL_S = 10.0
_MAX_LOG_KEYS = 4096


@dataclass(frozen=True)
class OpenLimits:
    """Bounds on unauthenticated calls (see the module docstring)."""

    max_calls: int = 64
    # Every party of a job run on one host by the launcher shares its address.
    max_calls_per_source: int = 16
    request_timeout_s: float = 5.0
    max_request_bytes: int = 256 << 10

    def __post_init__(self) -> None:
        if self.max_calls < 1 or self.max_calls_per_source < 1 or self.max_request_bytes < 1:
            raise UsageError(f"open-call limits must be positive: {self}")
        if not self.request_timeout_s > 0:
            raise UsageError(f"request_timeout_s must be positive, got {self.request_timeout_s}")


# A peer string names one connection (address and port): parsing it costs tens of
# microseconds, more than the rest of refusing a call, so each connection's is parsed once.
@functools.lru_cache(maxsize=4096)
def source_of(peer: str) -> str:
    """The source a gRPC peer string counts against: an IPv4 address, an IPv6 /64, else itself.

    'ipv4:10.0.0.1:5000' -> '10.0.0.1'; 'ipv6:%5B2001:db8::1%5D:5000' -> '2001:db8::/64'.
    """
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return peer
    host = urllib.parse.unquote(rest).rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(order=True)
class _Alarm:
    deadline: float
    seq: int
    context: grpc.ServicerContext = field(compare=False)
    armed: bool = field(default=True, compare=False)
    fired: bool = field(default=False, compare=False)


class _Watchdog:
    """One thread that cancels calls whose alarm was not disarmed in time."""

    def __init__(self) -> None:
        self._alarms: list[_Alarm] = []
        self._seq = itertools.count()
        self._condition = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def arm(self, timeout_s: float, context: grpc.ServicerContext) -> _Alarm:
        alarm = _Alarm(time.monotonic() + timeout_s, next(self._seq), context)
        with self._condition:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="enclavefl-open-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._alarms, alarm)
            self._condition.notify()
        return alarm

    def disarm(self, alarm: _Alarm) -> None:
        with self._condition:
            alarm.armed = False

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closed and (not self._alarms or self._alarms[0].deadline > time.monotonic()):
                    wait = self._alarms[0].deadline - time.monotonic() if self._alarms else None
                    self._condition.wait(wait)
                if self._closed:
                    return
                alarm = heapq.heappop(self._alarms)
                if not alarm.armed:
                    continue
                alarm.fired = True
            alarm.context.cancel()  # wakes the thread waiting for the request


class _OpenPool(futures.ThreadPoolExecutor):
    """The open services' threads; a call its guard would refuse is refused without one.

    gRPC hands each call to `submit` on its serving thread. A call from a source over the
    limits is run right there instead: its handler only aborts (it never waits for the
    request), which saves a thread wake-up and a new future per refused call. gRPC passes the
    call's event as the second argument (grpc/_server.py, `_handle_stream_unary`); should it
    ever not, such calls are refused on a pool thread as before (`refused_inline` shows which).
    Only the request-streaming handlers of `OpenCallGuard.handler` may use this pool: for a
    unary one gRPC would wait for the request first, on its serving thread.
    """

    def __init__(self, guard: OpenCallGuard, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._guard = guard

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        source = _source_of_event(args[1]) if len(args) > 1 else None
        if source is None or self._guard._has_room(source):
            return super().submit(fn, *args, **kwargs)
        self._guard._refusing_here.active = True
        try:
            fn(*args, **kwargs)
        finally:
            self._guard._refusing_here.active = False
        return _DONE


# What `_OpenPool` returns for a call it ran inline: gRPC only adds a done callback, which a
# finished future runs at once and does not keep, so one serves every such call.
_DONE: futures.Future[Any] = futures.Future()
_DONE.set_result(None)


def _source_of_event(event: Any) -> str | None:
    """The source of the call a gRPC request event stands for, or None if it is not one."""
    peer = getattr(getattr(event, "call", None), "peer", None)
    if not callable(peer):
        return None
    raw = peer()
    return source_of(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))


class OpenCallGuard:
    """Wraps the unauthenticated handlers of one server in the limits of `OpenLimits`."""

    def __init__(self, limits: OpenLimits = OpenLimits(), *, name: str = "enclavefl") -> None:
        self.limits = limits
        # Spare threads beyond max_calls, for the excess calls a race lets through to a thread.
        self._pool = _OpenPool(self, max_workers=limits.max_calls + 2, thread_name_prefix=f"{name}-open")
        self._refusing_here = threading.local()  # set while _OpenPool refuses a call inline
        self._watchdog = _Watchdog()
        self._lock = threading.Lock()
        self._total = 0
        self._per_source: dict[str, int] = {}
        self._last_logged: dict[tuple[str, str], float] = {}
        # Calls refused by these limits, and of those how many without a pool thread (for
        # benchmarks and tests).
        self.refused = 0
        self.refused_inline = 0

    def close(self) -> None:
        self._watchdog.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def handler(
        self,
        method: str,
        behavior: Callable[[Any, grpc.ServicerContext], Any],
        request_type: type[Message],
        response_serializer: Callable[[Any], bytes],
    ) -> grpc.RpcMethodHandler:
        """A handler running `behavior(request, context)` for one request under the limits."""

        def deserialize(raw: bytes) -> Any:
            if len(raw) > self.limits.max_request_bytes:
                return Malformed(f"{len(raw)} bytes, more than the {self.limits.max_request_bytes} allowed")
            try:
                return request_type.FromString(raw)
            except DecodeError as exc:
                return Malformed(f"does not parse: {exc}")

        def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            peer = context.peer()
            source = source_of(peer)
            if getattr(self._refusing_here, "active", False):
                with self._lock:
                    self.refused += 1
                    self.refused_inline += 1
                self._warn(source, "limit", "refused %s from %s: too many unauthenticated calls", method, peer)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many unauthenticated calls; retry later")
            if not self._enter(source):
                self._warn(source, "limit", "refused %s from %s: too many unauthenticated calls", method, peer)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many unauthenticated calls; retry later")
            try:
                request = self._first_request(requests, context, method, peer, source)
                return behavior(request, context)
            finally:
                self._leave(source)

        handle.experimental_thread_pool = self._pool  # type: ignore[attr-defined]  # grpc reads this
        return grpc.stream_unary_rpc_method_handler(
            handle, request_deserializer=deserialize, response_serializer=response_serializer
        )

    def _first_request(
        self, requests: Iterator[Any], context: grpc.ServicerContext, method: str, peer: str, source: str
    ) -> Any:
        alarm = self._watchdog.arm(self.limits.request_timeout_s, context)
        try:
            request = next(requests, None)
        except grpc.RpcError:
            request = None
        finally:
            self._watchdog.disarm(alarm)
        if alarm.fired:
            self._warn(
                source, "stalled", "cancelled %s from %s: no request within %g s", method, peer,
                self.limits.request_timeout_s,
            )  # fmt: skip
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no request message in time")
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "exactly one request message is required")
        if isinstance(request, Malformed):
            self._warn(source, "malformed", "refused malformed %s from %s: request %s", method, peer, request.reason)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")
        return request

    def _has_room(self, source: str) -> bool:
        """Whether a call from `source` would be let in now (it still has to `_enter`)."""
        with self._lock:
            return (
                self._total < self.limits.max_calls
                and self._per_source.get(source, 0) < self.limits.max_calls_per_source
            )

    def _enter(self, source: str) -> bool:
        with self._lock:
            held = self._per_source.get(source, 0)
            if self._total >= self.limits.max_calls or held >= self.limits.max_calls_per_source:
                self.refused += 1
                return False
            self._total += 1
            self._per_source[source] = held + 1
            return True

    def _leave(self, source: str) -> None:
        with self._lock:
            self._total -= 1
            held = self._per_source[source] - 1
            if held:
                self._per_source[source] = held
            else:
                del self._per_source[source]

    def _warn(self, source: str, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last_logged.get((source, kind))
            if last is not None and now - last < _LOG_INTERVAL_S:
                return
            if len(self._last_logged) >= _MAX_LOG_KEYS:
                self._last_logged.clear()
            self._last_logged[(source, kind)] = now
        log.warning(message + " (further such lines from this source muted for %g s)", *args, _LOG_INTERVAL_S)
