"""DpFedAvg: worker-level DP through the public strategy API (clipping, noise, sampling, accounting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enclavefl.errors import ConfigError
from enclavefl.hfl.contract import Contribution, check_strategy
from enclavefl.hfl.dp import DpFedAvg
from enclavefl.privacy import epsilon_for

STATE = {"w": np.zeros((4, 5), np.float32), "b": np.zeros(5, np.float32), "count": np.array(3, np.int64)}


def contribution(worker: str, scale: float) -> Contribution:
    rng = np.random.default_rng(abs(hash(worker)) % 2**32)
    update = {"w": rng.standard_normal((4, 5)).astype(np.float32) * scale,
              "b": rng.standard_normal(5).astype(np.float32) * scale, "count": np.array(1, np.int64)}
    return Contribution(worker, 10, update, 0)


def norm(values: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for k, v in values.items() if k != "count")))


def test_each_worker_moves_the_model_by_at_most_clip_over_expected_workers() -> None:
    strategy = DpFedAvg(fraction=1.0, clip=0.5, delta=1e-5, rounds=3, population=4, noise_multiplier=0.0)
    check_strategy(strategy)
    for scale in (1e-3, 1.0, 1e3):
        strategy.configure_round(1, STATE)
        new, metrics = strategy.aggregate(1, [contribution("a", scale)])
        assert norm(new) <= 0.5 / 4 + 1e-6
        assert metrics["dp_sampled_workers"] == 1.0
        assert "count" not in new  # integer buffers keep their value
    strategy.configure_round(2, STATE)
    new, metrics = strategy.aggregate(2, [contribution(w, 100.0) for w in "abcd"])
    assert norm(new) <= 4 * 0.5 / 4 + 1e-6 and metrics["dp_clipped_workers"] == 4


def test_noise_std_sampling_and_accounting() -> None:
    strategy = DpFedAvg(fraction=0.5, clip=1.0, delta=1e-5, rounds=40, population=10, noise_multiplier=1.5,
                        generator=torch.Generator().manual_seed(0))
    draws, sampled = [], []
    big = {"w": np.zeros((100, 100), np.float32), "b": np.zeros(100, np.float32)}
    for r in range(1, 41):
        strategy.configure_round(r, big)
        zero = [Contribution(w, 1, {k: np.zeros_like(v) for k, v in big.items()}, 0) for w in "abcdefghij"]
        new, metrics = strategy.aggregate(r, zero)
        draws.append(np.concatenate([new["w"].ravel(), new["b"]]))
        sampled.append(metrics["dp_sampled_workers"])
    noise = np.concatenate(draws) * (0.5 * 10)  # undo the division by the expected count
    assert float(noise.std()) == pytest.approx(1.5 * 1.0, rel=0.05)
    assert 3.5 <= np.mean(sampled) <= 6.5  # 400 draws at probability 0.5
    assert metrics["dp_epsilon"] == pytest.approx(
        epsilon_for(noise_multiplier=1.5, sample_rate=0.5, steps=40, delta=1e-5), rel=1e-12)


def test_the_accountant_survives_a_checkpoint() -> None:
    strategy = DpFedAvg(fraction=0.5, clip=1.0, delta=1e-5, rounds=10, population=2, noise_multiplier=1.0)
    strategy.configure_round(1, STATE)
    strategy.aggregate(1, [contribution("a", 1.0)])
    saved = strategy.state_dict()
    resumed = DpFedAvg(fraction=0.5, clip=1.0, delta=1e-5, rounds=10, population=2, noise_multiplier=1.0)
    resumed.load_state_dict(saved)
    assert resumed.central.accountant.steps == 1 and resumed.central.epsilon == strategy.central.epsilon
    other = DpFedAvg(fraction=0.25, clip=1.0, delta=1e-5, rounds=10, population=2, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="differ from this job's"):
        other.load_state_dict(saved)
