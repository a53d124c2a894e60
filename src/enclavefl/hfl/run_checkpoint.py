"""The parameter server's checkpoints: what a sealed checkpoint of a run holds, and resuming.

A checkpoint of version v holds the strategy driver's state (strategy name, version, the
strategy's own state and, unless the strategy keeps it, the model), the evaluations so
far, the per-worker counts and the RNG states, in `CheckpointStore`'s sealed files. A
checkpoint of another format, strategy or strategy settings is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from enclavefl.errors import FormatError
from enclavefl.hfl.checkpoint import CheckpointStore, rng_state, set_rng_state
from enclavefl.hfl.driver import StrategyDriver

__all__ = ["CHECKPOINT_FORMAT", "Restored", "RunCheckpoints"]

log = logging.getLogger("enclavefl.hfl")

CHECKPOINT_FORMAT = 2  # 2: the driver's state (strategy name, version, the strategy's own state)


@dataclass(frozen=True)
class Restored:
    """What a resumed run continues from (the driver and the RNGs are already restored)."""

    version: int
    evaluations: list[dict[str, Any]]
    workers: dict[str, dict[str, int]]


class RunCheckpoints:
    """Seals the run every `every` versions and after the last; resumes from the newest."""

    def __init__(self, store: CheckpointStore, every: int) -> None:
        self.store = store
        self.every = every

    def due(self, version: int, last: bool) -> bool:
        return version % self.every == 0 or last

    def save(
        self, version: int, driver: StrategyDriver, evaluations: list[dict[str, Any]], workers: Mapping[str, Any]
    ) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "strategy": driver.state_dict(),
            "evaluations": list(evaluations),
            "workers": dict(workers),
            "rng": rng_state(),
        }
        path = self.store.save(version, state)
        log.info("checkpoint of version %d sealed to %s", version, path)

    def restore(self, driver: StrategyDriver) -> Restored | None:
        """Load the newest checkpoint into `driver` (and the RNGs); None when there is none."""
        found = self.store.load_latest()
        if found is None:
            log.info("no checkpoint in %s: starting at version 0", self.store.directory)
            return None
        version, state = found
        if state.get("format") != CHECKPOINT_FORMAT:
            raise FormatError(f"checkpoint format {state.get('format')!r} not supported (expected {CHECKPOINT_FORMAT})")
        driver.load_state_dict(state["strategy"])
        if driver.version != version:
            raise FormatError(f"checkpoint file of version {version} holds strategy version {driver.version}")
        set_rng_state(state["rng"])
        log.info("resumed from checkpoint version %d (%s)", version, self.store.path(version))
        return Restored(version, list(state.get("evaluations", [])), dict(state.get("workers", {})))
