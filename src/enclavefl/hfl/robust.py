"""Robust aggregators: coordinate-wise median and trimmed mean, through the public strategy API.

Both are written against `enclavefl.hfl.contract` only (numpy in, numpy out), as a user's
strategy would be. They resist a minority of faulty or poisoned workers: per coordinate,
the median ignores any value that is not in the middle; the trimmed mean cuts the
`trim_fraction` largest and smallest values (floor(trim_fraction * workers) each side)
before averaging, so it tolerates that many bad workers per side. Neither weights by
num_examples (a worker could claim any count). They need every contribution of a round
at once, so the server holds them all (one payload per worker) until the round closes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from enclavefl.errors import ConfigError, FormatError, UsageError
from enclavefl.hfl.contract import Contribution
from enclavefl.hfl.registry import NoParams, TrimmedMeanParams
from enclavefl.validate import is_number

__all__ = ["CoordinateMedian", "TrimmedMean"]

log = logging.getLogger("enclavefl.hfl")


class _RobustAggregator:
    """Shared hooks: keep the round's state, combine the updates per coordinate."""

    name: ClassVar[str]
    kind: ClassVar[str] = "update"

    def __init__(self) -> None:
        self._state: Mapping[str, np.ndarray] | None = None

    def hyper(self) -> dict[str, Any]:
        return {}

    def configure_round(self, round: int, state: Mapping[str, np.ndarray]) -> dict[str, Any]:
        self._state = state
        return {}

    def aggregate(
        self, round: int, contributions: Sequence[Contribution]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if not contributions:
            raise UsageError(f"{self.name}: cannot aggregate zero contributions (round {round})")
        if self._state is None:
            raise UsageError(f"{self.name}: aggregate before configure_round")
        names = set(contributions[0].update)
        for c in contributions:
            if set(c.update) != names:
                raise UsageError(f"{self.name}: worker {c.worker!r} sent updates for other names than the others")
        new: dict[str, np.ndarray] = {}
        for name in contributions[0].update:
            start = self._state[name]
            stacked = np.stack([np.asarray(c.update[name], dtype=np.float64) for c in contributions])
            combined = self._combine(stacked)
            if np.issubdtype(start.dtype, np.integer):
                combined = np.rint(combined)
            new[name] = (start.astype(np.float64) + combined).astype(start.dtype)
        return new, {"workers": float(len(contributions))}

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, "hyper": self.hyper()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "strategy" not in state or "hyper" not in state:
            raise FormatError(f"{self.name}: checkpoint strategy state lacks strategy/hyper")
        if state["strategy"] != self.name:
            raise ConfigError(f"checkpoint is of strategy {state['strategy']!r}, this job runs {self.name!r}")
        if state["hyper"] != self.hyper():
            raise ConfigError(
                f"checkpoint {self.name} parameters {state['hyper']} differ from this job's {self.hyper()}"
            )


class CoordinateMedian(_RobustAggregator):
    """`median`: the new global value of each coordinate moves by the median of the workers' updates."""

    name = "median"
    Params = NoParams

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)


class TrimmedMean(_RobustAggregator):
    """`trimmed-mean`: per coordinate, the mean of the updates once the extremes are cut."""

    name = "trimmed-mean"
    Params = TrimmedMeanParams

    def __init__(self, trim_fraction: float = 0.1) -> None:
        super().__init__()
        if not is_number(trim_fraction) or not 0 <= trim_fraction < 0.5:
            raise UsageError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
        self.trim_fraction = float(trim_fraction)
        self._warned = False

    def hyper(self) -> dict[str, Any]:
        return {"trim_fraction": self.trim_fraction}

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        workers = stacked.shape[0]
        cut = math.floor(self.trim_fraction * workers)
        if cut == 0 and not self._warned:
            self._warned = True
            log.warning("trimmed-mean: trim_fraction %g of %d workers cuts nothing (a plain mean)",
                        self.trim_fraction, workers)  # fmt: skip
        ordered = np.sort(stacked, axis=0)
        return ordered[cut : workers - cut].mean(axis=0)
