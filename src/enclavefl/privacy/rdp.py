"""Renyi-DP accounting of the sampled Gaussian mechanism, and noise calibration.

One step of DP-SGD (or of clipped, noised aggregation over sampled workers) is the sampled
Gaussian mechanism: each unit of privacy (a record, a worker) is included with probability
`q` (Poisson sampling), its contribution is clipped to norm C, and Gaussian noise of
standard deviation sigma*C is added to the sum. Its RDP at order alpha is computed as in
Mironov, Talwar and Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism"
(2019), composed over steps by addition, and converted to (epsilon, delta)-DP with Balle et
al. 2020, Theorem 21. The numerics follow TensorFlow Privacy's and Opacus's
`analysis/rdp.py` (Apache-2.0), and so do the default orders, so that the epsilon reported
here is the one Opacus's RDP accountant reports for the same (sigma, q, steps, delta).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enclavefl.errors import UsageError
from enclavefl.validate import is_int

__all__ = [
    "ACCOUNTANT",
    "DEFAULT_ORDERS",
    "RdpAccountant",
    "Spending",
    "epsilon_for",
    "noise_multiplier_for",
    "resolve_noise_multiplier",
]

ACCOUNTANT = "rdp"
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
_MAX_SIGMA = 1e6


def _log_add(logx: float, logy: float) -> float:
    a, b = min(logx, logy), max(logx, logy)
    if a == -np.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_sub(logx: float, logy: float) -> float:
    if logx < logy:
        raise ArithmeticError("log-space subtraction with a negative result")
    if logy == -np.inf:
        return logx
    if logx == logy:
        return -np.inf
    try:
        return math.log(math.expm1(logx - logy)) + logy
    except OverflowError:
        return logx


def _log_erfc(x: float) -> float:
    from scipy import special  # here, not at import: every vfl party imports this module

    return math.log(2) + float(special.log_ndtr(-x * 2**0.5))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    from scipy import special  # here, not at import: every vfl party imports this module

    log_a = -np.inf
    for i in range(alpha + 1):
        log_coef = math.log(special.binom(alpha, i)) + i * math.log(q) + (alpha - i) * math.log(1 - q)
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma**2))
    return float(log_a)


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    from scipy import special  # here, not at import: every vfl party imports this module

    log_a0, log_a1 = -np.inf, -np.inf
    i = 0
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    while True:
        coef = special.binom(alpha, i)
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        i += 1
        if max(log_s0, log_s1) < -30:
            break
    return _log_add(log_a0, log_a1)


def _rdp_one_step(q: float, sigma: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    log_a = _log_a_int(q, sigma, int(alpha)) if float(alpha).is_integer() else _log_a_frac(q, sigma, alpha)
    return log_a / (alpha - 1)


@functools.lru_cache(maxsize=256)
def _rdp_vector(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one step at every order (cached: an accountant asks again every round)."""
    vector = np.array([_rdp_one_step(q, sigma, alpha) for alpha in orders])
    vector.flags.writeable = False
    return vector


def _epsilon(orders: Sequence[float], rdp: np.ndarray, delta: float) -> tuple[float, float]:
    alphas = np.asarray(orders, dtype=float)
    with np.errstate(invalid="ignore"):
        eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return float(eps[best]), float(alphas[best])


def _check(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise UsageError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not 0 <= sample_rate <= 1:
        raise UsageError(f"sampling rate must be within [0, 1], got {sample_rate}")
    if not is_int(steps) or steps < 0:
        raise UsageError(f"steps must be an int >= 0, got {steps!r}")


@dataclass
class RdpAccountant:
    """Composes sampled Gaussian steps; `epsilon(delta)` is what they spent so far.

    `history` holds (noise_multiplier, sample_rate, steps) runs, as Opacus's accountant
    does; it is what a checkpoint saves (`state_dict`) so a resumed job keeps counting.
    """

    orders: tuple[float, ...] = DEFAULT_ORDERS
    history: list[tuple[float, float, int]] = field(default_factory=list)

    name = ACCOUNTANT

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        _check(noise_multiplier, sample_rate, steps)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, done = self.history[-1]
            self.history[-1] = (sigma, q, done + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), steps))

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def rdp(self) -> np.ndarray:
        total = np.zeros(len(self.orders))
        for sigma, q, steps in self.history:
            total += steps * _rdp_vector(q, sigma, tuple(self.orders))
        return total

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at `delta` (0 before any step)."""
        if not 0 < delta < 1:
            raise UsageError(f"delta must be within (0, 1), got {delta}")
        if not self.history:
            return 0.0
        return _epsilon(self.orders, self.rdp(), delta)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.name, "history": [list(run) for run in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("accountant") != self.name:
            raise UsageError(f"accountant state is for {state.get('accountant')!r}, not {self.name!r}")
        history = []
        for run in state.get("history", []):
            sigma, q, steps = run
            _check(float(sigma), float(q), int(steps))
            history.append((float(sigma), float(q), int(steps)))
        self.history = history


class Spending:
    """The accounting of a sampled Gaussian mechanism, shared by DP-SGD (per worker step) and
    central DP (per round): what was spent, what more steps would cost, whether they fit.

    `max_epsilon` is the policy's budget (None: no budget); the noise multiplier is given,
    or calibrated to spend `target_epsilon` over the `steps` the job plans.
    """

    accountant: RdpAccountant
    delta: float
    noise_multiplier: float
    sample_rate: float
    max_epsilon: float | None = None

    def __init__(
        self,
        *,
        delta: float,
        sample_rate: float,
        steps: int,
        target_epsilon: float | None,
        noise_multiplier: float | None,
        max_epsilon: float | None,
    ) -> None:
        self.delta = float(delta)
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = resolve_noise_multiplier(
            target_epsilon=target_epsilon, noise_multiplier=noise_multiplier, delta=delta,
            sample_rate=self.sample_rate, steps=steps,
        )
        self.max_epsilon = max_epsilon
        self.accountant = RdpAccountant()

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far."""
        return self.accountant.epsilon(self.delta)

    def epsilon_after(self, steps: int, *, from_start: bool = False) -> float:
        """The epsilon once `steps` more steps are spent (`from_start`: `steps` from none)."""
        probe = RdpAccountant(history=[] if from_start else list(self.accountant.history))
        probe.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=steps)
        return probe.epsilon(self.delta)

    def fits(self, steps: int = 1) -> bool:
        """Whether `steps` more steps keep the spent epsilon within max_epsilon."""
        return self.max_epsilon is None or self.epsilon_after(steps) <= self.max_epsilon

    def report(self) -> dict[str, Any]:
        """What every mechanism records about its privacy (each adds its own parameters)."""
        return {
            "dp_epsilon": self.epsilon,
            "dp_delta": self.delta,
            "dp_accountant": self.accountant.name,
            "dp_noise_multiplier": self.noise_multiplier,
        }

    def spend(self) -> None:
        """Account one step."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)


def epsilon_for(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon of `steps` sampled Gaussian steps (RDP accountant)."""
    accountant = RdpAccountant()
    accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return accountant.epsilon(delta)


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, tolerance: float = 0.01
) -> float:
    """The smallest noise multiplier (within `tolerance` in epsilon, by bisection, as Opacus's
    `get_noise_multiplier`) whose `steps` steps at `sample_rate` spend at most `target_epsilon`."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise UsageError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        high *= 2
        if high > _MAX_SIGMA:
            raise UsageError(
                f"epsilon {target_epsilon:g} at delta {delta:g} cannot be reached over {steps} steps "
                f"at sampling rate {sample_rate:g}: fewer steps or a larger budget are needed"
            )
        eps_high = epsilon_for(noise_multiplier=high, sample_rate=sample_rate, steps=steps, delta=delta)
    while target_epsilon - eps_high > tolerance:
        middle = (low + high) / 2
        eps = epsilon_for(noise_multiplier=middle, sample_rate=sample_rate, steps=steps, delta=delta)
        if eps < target_epsilon:
            high, eps_high = middle, eps
        else:
            low = middle
    return high


def resolve_noise_multiplier(
    *, target_epsilon: float | None, noise_multiplier: float | None, delta: float, sample_rate: float, steps: int
) -> float:
    """The noise multiplier given, or the one calibrated to spend `target_epsilon` over `steps`."""
    if (target_epsilon is None) == (noise_multiplier is None):
        raise UsageError("give exactly one of target_epsilon and noise_multiplier")
    if noise_multiplier is not None:
        return float(noise_multiplier)
    assert target_epsilon is not None
    return noise_multiplier_for(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps)
