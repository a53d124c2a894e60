"""Central (worker-level) differential privacy at the parameter server: DP-FedAvg.

McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018):
each round the server samples every live worker independently with probability `fraction`
(Poisson sampling, with a secret random source, so that not being picked hides a worker);
each sampled worker's update (all its tensors as one vector) is clipped to L2 norm `clip`;
the server sums the clipped updates, adds N(0, (sigma * clip)^2) to every coordinate, and
divides by the *expected* number of sampled workers, fraction * N, a constant, so that one
worker changes the result by at most clip / (fraction * N). One round is one sampled
Gaussian step with sampling rate `fraction`, accounted with the RDP accountant.

All of it runs inside the server's enclave: workers receive only the noised aggregate.
`CentralDp` is the mechanism and its accounting; the parameter server calls `sample` when a
round opens and `aggregate` when it closes.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from enclavefl.errors import UsageError
from enclavefl.privacy.mechanisms import add_gaussian_noise, clip_to_norm
from enclavefl.privacy.rdp import Spending

__all__ = ["CentralDp"]


class CentralDp(Spending):
    """Worker sampling, per-worker clipping, Gaussian noise on the sum, accounting.

    Give `target_epsilon` (sigma is calibrated to spend it over `rounds`) or
    `noise_multiplier`. `max_epsilon` is the policy's budget: `fits()` says whether one
    more round stays within it.
    """

    def __init__(
        self,
        *,
        fraction: float,
        clip: float,
        delta: float,
        rounds: int,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        max_epsilon: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 < fraction <= 1:
            raise UsageError(f"fraction must be within (0, 1], got {fraction}")
        if not (math.isfinite(clip) and clip > 0):
            raise UsageError(f"clip must be a finite number > 0, got {clip}")
        # One round is one step; the sampling fraction (the user's word) is its sampling rate.
        super().__init__(delta=delta, sample_rate=fraction, steps=rounds, target_epsilon=target_epsilon,
                         noise_multiplier=noise_multiplier, max_epsilon=max_epsilon)  # fmt: skip
        self.fraction = self.sample_rate
        self.clip = float(clip)
        self.rounds = rounds
        # Which workers are sampled, and the noise, must be unpredictable to everyone outside.
        self._random = secrets.SystemRandom()
        self._generator = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))

    def planned_epsilon(self) -> float:
        """The epsilon spent once the rest of the planned rounds are."""
        return self.epsilon_after(max(self.rounds - self.accountant.steps, 0))

    def sample(self, workers: Sequence[str]) -> list[str]:
        """The workers of this round: each independently with probability `fraction`."""
        return [worker for worker in workers if self._random.random() < self.fraction]

    def aggregate(
        self, updates: Mapping[str, Mapping[str, torch.Tensor]], *, population: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The noised mean update of the sampled workers' `updates` (worker -> name -> tensor),
        over `population` workers that could have been sampled; spends one round."""
        if population < 1:
            raise UsageError(f"population must be >= 1, got {population}")
        if not updates:
            raise UsageError("central DP aggregates at least one sampled worker's update (an empty round "
                             "releases noise only: call noise_only)")
        names = None
        total: dict[str, torch.Tensor] = {}
        clipped = 0
        for worker, update in updates.items():
            if names is None:
                names = set(update)
            elif set(update) != names:
                raise UsageError(f"worker {worker}'s update names differ from the others'")
            bounded, norm = clip_to_norm(update, self.clip)
            clipped += norm > self.clip
            for name, tensor in bounded.items():
                total[name] = total[name] + tensor.double() if name in total else tensor.double()
        return self._release(total, population), {"dp_clipped_workers": clipped, **self.report()}

    def noise_only(self, like: Mapping[str, torch.Tensor], *, population: int) -> dict[str, torch.Tensor]:
        """A round where no worker was sampled still releases (noise-only) and is accounted."""
        return self._release({name: torch.zeros_like(t, dtype=torch.float64) for name, t in like.items()}, population)

    def _release(self, total: dict[str, torch.Tensor], population: int) -> dict[str, torch.Tensor]:
        noised = add_gaussian_noise(total, self.noise_multiplier * self.clip, generator=self._generator)
        expected = self.fraction * population
        self.spend()
        return {name: (tensor / expected).float() for name, tensor in noised.items()}

    def report(self) -> dict[str, Any]:
        return {
            **super().report(),
            "dp_clip": self.clip,
            "dp_fraction": self.fraction,
            "dp_rounds": self.accountant.steps,
        }
