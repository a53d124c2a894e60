"""Opt-in glibc malloc tuning for processes that stream multi-MiB messages.

By default glibc serves every multi-MiB buffer (each received gRPC message, each frame
being sent) with a fresh mmap and unmaps it when freed, so every chunk pays page faults
and page zeroing: about a quarter of a receiver's CPU time at 4 MiB chunks. Fixed, higher
mmap and trim thresholds keep those buffers in the heap for reuse. The setting is
process-wide, hence opt-in: a party calls `tune_allocator()` once at start-up (setting
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ in the environment does the same).

A server that receives from many peers at once wants the opposite: each gRPC thread's
arena keeps the multi-MiB buffers it once held, so peak memory grows with the number of
peers. `bound_allocator()` trades the page faults for memory near the live data.
"""

from __future__ import annotations

import ctypes
import logging

from enclavefl.errors import UsageError

log = logging.getLogger("enclavefl.net")

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MAX_MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)


def tune_allocator(*, mmap_threshold: int = 16 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed buffers below `mmap_threshold` for reuse, and return heap memory to the
    system only beyond `trim_threshold` free at its top. False where malloc is not glibc's."""
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise UsageError(f"mmap_threshold must be in 1..{MAX_MMAP_THRESHOLD}, got {mmap_threshold}")
    if trim_threshold < mmap_threshold:
        raise UsageError(f"trim_threshold ({trim_threshold}) must be at least mmap_threshold ({mmap_threshold})")
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        log.info("malloc tuning skipped: this C library has no mallopt")
        return False
    tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not tuned:
        log.info("malloc tuning skipped: mallopt refused the thresholds")
    return tuned


def bound_allocator(*, mmap_threshold: int = 128 << 10, arenas: int = 2) -> bool:
    """Serve buffers over `mmap_threshold` with mmap (returned when freed) and cap the
    malloc arenas at `arenas`, so a many-peer server's RSS stays near its live data.
    Call before the server's threads start. False where malloc is not glibc's."""
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise UsageError(f"mmap_threshold must be in 1..{MAX_MMAP_THRESHOLD}, got {mmap_threshold}")
    if arenas < 1:
        raise UsageError(f"arenas must be >= 1, got {arenas}")
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        log.info("malloc bounding skipped: this C library has no mallopt")
        return False
    bounded = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_ARENA_MAX, arenas))
    if not bounded:
        log.info("malloc bounding skipped: mallopt refused the settings")
    return bounded
