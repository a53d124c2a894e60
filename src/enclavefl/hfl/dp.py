"""`DpFedAvg`: worker-level (central) differential privacy as a strategy of the public API.

Written against `enclavefl.hfl.contract` only, as a user's strategy would be, around
`enclavefl.privacy.central.CentralDp` (DP-FedAvg, McMahan et al. 2018). Every round, inside
the server: each contribution is kept with probability `fraction` (Poisson sampling from
the OS's secret randomness; the contract has every live worker train, and the ones not
drawn are discarded unseen, which gives the output the same distribution as not asking
them), each kept update is clipped to norm `clip` over all its floating-point tensors,
the sum gets N(0, (sigma*clip)^2) noise and is divided by `fraction * population` (the
job's number of workers: a constant, so one worker moves the result by at most
clip / (fraction * population)). Integer buffers (BatchNorm counters) are left unchanged:
they would count the sampled workers' batches. Workers receive only the noised state.

The accountant (RDP, one sampled Gaussian step per round) is part of `state_dict`, so a
server resumed from its sealed checkpoint keeps counting. With `max_epsilon` (the policy's
budget), `stop_reason` ends the run before a round that would spend more than it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from enclavefl.errors import ConfigError, FormatError, UsageError
from enclavefl.hfl.contract import Contribution
from enclavefl.privacy.central import CentralDp
from enclavefl.validate import is_int, is_number

__all__ = ["DpFedAvg"]


class DpFedAvgParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fraction: float = Field(gt=0, le=1)
    """Probability that each worker's update is used in a round."""
    clip: float = Field(gt=0)
    """L2 norm each worker's update is clipped to."""
    delta: float = Field(gt=0, lt=1)
    rounds: int = Field(ge=1)
    """Rounds the job plans (the noise is calibrated over them)."""
    population: int = Field(ge=1)
    """Workers of the job."""
    target_epsilon: float | None = Field(None, gt=0)
    noise_multiplier: float | None = Field(None, ge=0)


class DpFedAvg:
    """Sampled, clipped, noised FedAvg of the workers' updates; see the module docstring."""

    name = "dp-fedavg"
    kind = "update"
    Params = DpFedAvgParams

    def __init__(
        self,
        *,
        fraction: float,
        clip: float,
        delta: float,
        rounds: int,
        population: int,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        max_epsilon: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not is_int(population) or population < 1:
            raise UsageError(f"population must be an int >= 1, got {population!r}")
        self.population = population
        self.central = CentralDp(fraction=fraction, clip=clip, delta=delta, rounds=rounds,
                                 target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
                                 max_epsilon=max_epsilon, generator=generator)  # fmt: skip
        self._state: Mapping[str, np.ndarray] | None = None

    def hyper(self) -> dict[str, Any]:
        c = self.central
        return {"fraction": c.fraction, "clip": c.clip, "delta": c.delta, "noise_multiplier": c.noise_multiplier,
                "population": self.population}  # fmt: skip

    def configure_round(self, round: int, state: Mapping[str, np.ndarray]) -> dict[str, Any]:
        self._state = state
        return {}

    def aggregate(
        self, round: int, contributions: Sequence[Contribution]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if self._state is None:
            raise UsageError(f"{self.name}: aggregate before configure_round")
        state = self._state
        names = [n for n, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
        kept = self.central.sample([c.worker for c in contributions])
        updates = {
            c.worker: {n: torch.from_numpy(np.asarray(c.update[n], dtype=np.float64)) for n in names}
            for c in contributions
            if c.worker in kept
        }
        for worker, update in updates.items():
            missing = [n for n in names if n not in update]
            if missing:
                raise UsageError(f"{self.name}: worker {worker!r} sent no update for {missing[:3]}")
        if updates:
            mean, metrics = self.central.aggregate(updates, population=self.population)
        else:
            like = {n: torch.from_numpy(np.asarray(state[n], dtype=np.float64)) for n in names}
            mean, metrics = self.central.noise_only(like, population=self.population), self.central.report()
        new = {n: (np.asarray(state[n], dtype=np.float64) + mean[n].double().numpy()).astype(state[n].dtype)
               for n in names}  # fmt: skip
        numbers = {k: float(v) for k, v in metrics.items() if is_number(v)}
        return new, {**numbers, "dp_sampled_workers": float(len(updates))}

    def stop_reason(self) -> str | None:
        """"privacy budget" when one more round would spend more than `max_epsilon`."""
        return None if self.central.fits(1) else "privacy budget"

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, "hyper": self.hyper(), "accountant": self.central.accountant.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or not {"strategy", "hyper", "accountant"} <= set(state):
            raise FormatError(f"{self.name}: checkpoint strategy state lacks strategy/hyper/accountant")
        if state["strategy"] != self.name:
            raise ConfigError(f"checkpoint is of strategy {state['strategy']!r}, this job runs {self.name!r}")
        if state["hyper"] != self.hyper():
            raise ConfigError(
                f"checkpoint {self.name} parameters {state['hyper']} differ from this job's {self.hyper()}"
            )
        self.central.accountant.load_state_dict(state["accountant"])
