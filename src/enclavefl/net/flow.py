"""Flow control for servers: bounded places for large uploads and replies.

A server that takes large tensors from many peers must bound how many it holds at once,
whatever the peers do. `Places` hands out at most `count` places; `UploadGate` is a
tensor sink that makes one named tensor of each message (the large one, sent last) wait
for a place before its buffer is allocated, so a message never holds two places and at
most `count` such tensors are in memory or in the transport at once. A place goes back
when its holder releases it, or when the received tensor is freed.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from enclavefl.errors import UsageError
from enclavefl.net.tensors import ArraySink, TensorSpec, TensorWriter
from enclavefl.validate import is_int

__all__ = ["GatedPayload", "Places", "Slot", "UploadGate"]


class Slot:
    """One place, released once (explicitly, or when what holds it is freed)."""

    def __init__(self, semaphore: threading.BoundedSemaphore) -> None:
        self._semaphore = semaphore
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._semaphore.release()


class Places:
    """At most `count` holders at once; `what` names the setting in errors."""

    def __init__(self, count: int, what: str) -> None:
        if not is_int(count) or count < 1:
            raise UsageError(f"{what} must be an int >= 1, got {count!r}")
        self._semaphore = threading.BoundedSemaphore(count)

    def take(self) -> Slot:
        self._semaphore.acquire()
        return Slot(self._semaphore)


class GatedPayload:
    """A received tensor that holds a place of the upload gate until `release()`."""

    def __init__(self, tensor: Any, slot: Slot) -> None:
        self.tensor: Any = tensor
        self._slot = slot
        # If a handler never runs (the message failed after this tensor), freeing the
        # object gives the place back.
        weakref.finalize(self, slot.release)

    def release(self) -> None:
        self.tensor = None
        self._slot.release()


class _GatedWriter:
    def __init__(self, inner: TensorWriter, slot: Slot) -> None:
        self._inner = inner
        self._slot = slot

    def write(self, data: bytes | memoryview) -> None:
        self._inner.write(data)

    def close(self) -> GatedPayload:
        return GatedPayload(self._inner.close(), self._slot)

    def abort(self) -> None:
        self._inner.abort()
        self._slot.release()


class UploadGate:
    """A tensor sink that lets at most `slots` tensors named `gated` be in memory at once.

    Other tensors of a message are received as usual (numpy arrays); the gated one
    arrives as a `GatedPayload` whose `release()` gives its place back.
    """

    def __init__(self, slots: int, *, gated: str, what: str = "max_pending_uploads") -> None:
        self._places = Places(slots, what)
        self._gated = gated
        self._arrays = ArraySink()

    def open(self, spec: TensorSpec) -> TensorWriter:
        if spec.name != self._gated:
            return self._arrays.open(spec)
        slot = self._places.take()
        try:
            inner = self._arrays.open(spec)
        except BaseException:
            slot.release()
            raise
        return _GatedWriter(inner, slot)
