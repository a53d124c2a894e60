"""Coordinate-wise median and trimmed mean: one worker sending huge updates cannot move the model far."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from enclavefl.errors import ConfigError, UsageError
from enclavefl.hfl.contract import Contribution
from enclavefl.hfl.registry import make_strategy
from enclavefl.hfl.robust import CoordinateMedian, TrimmedMean
from enclavefl.hfl.server import ParameterServer
from enclavefl.hfl.worker import Worker
from enclavefl.train import FitResult
from enclavefl.train.torch import TensorBatches, TorchTrainer

from test_hfl_roles import Federation, attested_server, blobs, tiny_model

STATE = {"w": np.zeros((3, 4), dtype=np.float32), "b": np.ones(4, dtype=np.float32), "n": np.array(5)}


def contributions(attack: float, honest: int = 4, seed: int = 0) -> list[Contribution]:
    rng = np.random.default_rng(seed)
    out = [
        Contribution(f"h{i}", 10, {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) if v.dtype.kind == "f"
                                   else np.array(1) for k, v in STATE.items()}, 0)
        for i in range(honest)
    ]
    out.append(Contribution("evil", 10_000, {k: np.full(v.shape, attack, dtype=v.dtype) for k, v in STATE.items()}, 0))
    return out


@pytest.mark.parametrize("strategy", [CoordinateMedian(), TrimmedMean(trim_fraction=0.2)])
def test_one_huge_update_does_not_move_the_model_far(strategy: Any) -> None:
    strategy.configure_round(1, STATE)
    new, metrics = strategy.aggregate(1, contributions(attack=1e6))
    assert metrics == {"workers": 5.0}
    for name in ("w", "b"):
        assert np.abs(new[name] - STATE[name]).max() < 0.05, name
        assert new[name].dtype == STATE[name].dtype
    assert int(new["n"]) == 6  # every worker counted one more batch


def test_a_plain_mean_is_moved_by_the_same_attack() -> None:
    updates = contributions(attack=1e6)
    mean = np.mean([c.update["w"] for c in updates], axis=0)
    assert np.abs(mean).max() > 1e5


def test_trimmed_mean_cuts_floor_fraction_of_workers_each_side() -> None:
    strategy = TrimmedMean(trim_fraction=0.25)
    state = {"x": np.zeros(1, dtype=np.float64)}
    strategy.configure_round(1, state)
    values = [-100.0, 1.0, 2.0, 3.0, 100.0]  # 5 workers: cut 1 each side
    new, _ = strategy.aggregate(1, [Contribution(str(i), 1, {"x": np.array([v])}, 0) for i, v in enumerate(values)])
    assert new["x"][0] == pytest.approx(2.0)


def test_robust_checkpoints_refuse_other_parameters() -> None:
    saved = TrimmedMean(trim_fraction=0.1).state_dict()
    TrimmedMean(trim_fraction=0.1).load_state_dict(saved)
    with pytest.raises(ConfigError, match="differ from this job's"):
        TrimmedMean(trim_fraction=0.2).load_state_dict(saved)
    with pytest.raises(ConfigError, match="this job runs 'median'"):
        CoordinateMedian().load_state_dict(saved)
    with pytest.raises(UsageError, match=r"trim_fraction must be in \[0, 0.5\)"):
        TrimmedMean(trim_fraction=0.5)
    assert isinstance(make_strategy("trimmed-mean", trim_fraction=0.3), TrimmedMean)
    with pytest.raises(ConfigError, match="trim_fraction: Input should be less than 0.5"):
        make_strategy("trimmed-mean", trim_fraction=0.7)


class Poisoner:
    """A faulty worker: whatever it is sent, it answers with weights 1e4 away."""

    def fit(self, weights: Mapping[str, np.ndarray], config: Any) -> FitResult:
        return FitResult({k: v + 1e4 for k, v in weights.items() if v.dtype.kind == "f"}, 1_000_000)

    def evaluate(self, weights: Any, config: Any) -> Any:
        raise AssertionError("not an evaluator")


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_parameter_server_with_a_poisoned_worker(name: str) -> None:
    initial = tiny_model(seed=3)
    start = {k: v.clone() for k, v in initial.state_dict().items()}
    params = {"trim_fraction": 0.25} if name == "trimmed-mean" else {}
    server = attested_server()
    ps = ParameterServer(server, make_strategy(name, **params), model=initial,
                         workers=["a", "b", "c", "evil"], total=2, round_timeout_s=30)  # fmt: skip
    fed = Federation(server, ps)
    for i, party in enumerate("abc"):
        data = blobs(24, seed=i)
        fed.worker(party, lambda c, d=data: Worker(c, TorchTrainer(tiny_model(), None, None, TensorBatches(d, 8))))
    fed.worker("evil", lambda c: Worker(c, Poisoner(), evaluates=False))
    summary = fed.run()
    assert not fed.errors, fed.errors
    assert summary["version"] == 2 and summary["strategy"] == name
    moved = max(float((ps.model.state_dict()[k].float() - start[k].float()).abs().max()) for k in start)
    assert 0 < moved < 1.0
