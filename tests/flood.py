"""An unauthenticated flood for tests and bench/bench_flood.py: many calls to an open
service (health, nonce, admission) whose request never comes, held open for as long as
the flood runs (a call the server ends is opened again).

It speaks TLS to the server (trusting its certificate, as any client can after a probe) but
never attests. The calls run on one asyncio loop in a thread of this process, spread over
`connections` channels, so a thousand of them cost little on this side.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

import grpc
from grpc import aio

from enclavefl.net.probe import fetch_certificate
from enclavefl.net.client import split_target


class StalledFlood:
    """`calls` stalled calls to `method` on `target`, held until `stop()`.

    `reopen_delay_s` is how long a call the server refused at once waits before it is
    opened again (the attacker keeps the pressure on without spinning a core).
    """

    def __init__(
        self,
        target: str,
        *,
        calls: int = 1000,
        connections: int = 10,
        method: str = "/enclavefl.v1.Health/Check",
        reopen_delay_s: float = 0.2,
    ) -> None:
        host, port = split_target(target)
        self._probed = fetch_certificate(host, port)
        self._target = target
        self._calls = calls
        self._connections = connections
        self._method = method
        self._reopen_delay_s = reopen_delay_s
        self.opened = 0
        self.ended: collections.Counter[str] = collections.Counter()
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="stalled-flood", daemon=True)
        self._channels: list[aio.Channel] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._held = 0

    @property
    def held(self) -> int:
        """Calls open right now (not yet ended by the server)."""
        return self._held

    def start(self) -> StalledFlood:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> dict[str, Any]:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        return {"opened": self.opened, "ended": dict(self.ended)}

    def __enter__(self) -> StalledFlood:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        self._stopping = asyncio.Event()
        credentials = grpc.ssl_channel_credentials(root_certificates=self._probed.pem)
        options = [("grpc.ssl_target_name_override", self._probed.common_name)]
        self._channels = [
            aio.secure_channel(self._target, credentials, options=options) for _ in range(self._connections)
        ]
        for channel in self._channels:
            await channel.channel_ready()
        self._tasks = [
            asyncio.create_task(self._hold(self._channels[i % self._connections])) for i in range(self._calls)
        ]

    async def _stop(self) -> None:
        assert self._stopping is not None
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()

    async def _hold(self, channel: aio.Channel) -> None:
        assert self._stopping is not None
        multicallable = channel.stream_unary(self._method)
        while not self._stopping.is_set():
            call = multicallable()  # no request is ever written
            self.opened += 1
            self._held += 1
            try:
                await call
                code = "OK"
            except aio.AioRpcError as exc:
                code = exc.code().name
            finally:
                self._held -= 1
            self.ended[code] += 1
            if code != "CANCELLED":  # not cancelled as stalled but refused at once: do not spin
                await asyncio.sleep(self._reopen_delay_s)
