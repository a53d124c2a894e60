"""TorchTrainer: a user's own torch loop behind the fit/evaluate/gradients contract."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from enclavefl.errors import UsageError
from enclavefl.hfl.registry import make_strategy
from enclavefl.hfl.server import ParameterServer
from enclavefl.hfl.worker import Worker, builtin_trainer
from enclavefl.train import EvalResult, FitResult, GradResult, Rows
from enclavefl.train.torch import TensorBatches, TorchTrainer

from test_hfl_roles import Federation, attested_server, blobs, tiny_model


class AdamTrainer(TorchTrainer):
    """A user's loop: Adam with a step scheduler and gradient clipping over their own DataLoader."""

    def train_one_round(self, config: Mapping[str, Any]) -> dict[str, float]:
        return adam_loop(self.model, self.train_loader, epochs=2)


def adam_loop(model: nn.Module, loader: Any, *, epochs: int) -> dict[str, float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    model.train()
    total = 0.0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
    return {"loss": total}


def loader(seed: int) -> DataLoader:
    x, y = blobs(48, seed=3)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_fedavg_one_worker_one_round_is_bit_identical_to_the_local_loop() -> None:
    initial = tiny_model(seed=11)
    local = copy.deepcopy(initial)
    adam_loop(local, loader(5), epochs=2)

    server = attested_server()
    ps = ParameterServer(server, make_strategy("fedavg", copy.deepcopy(initial)), workers=["a"], total=1,
                         round_timeout_s=30)  # fmt: skip
    fed = Federation(server, ps)
    # The worker starts from other weights: the server's state is what it trains.
    fed.worker("a", lambda c: Worker(c, AdamTrainer(tiny_model(seed=99), train_loader=loader(5))))
    summary = fed.run()
    assert not fed.errors, fed.errors
    assert summary["version"] == 1
    for (name, got), want in zip(ps.model.state_dict().items(), local.state_dict().values(), strict=False):
        assert torch.equal(got, want), name


def test_fit_returns_numpy_weights_and_does_not_touch_its_input() -> None:
    trainer = TorchTrainer(tiny_model(), None, None, TensorBatches(blobs(20, seed=0), 5))
    start = trainer.get_weights()
    kept = {k: v.copy() for k, v in start.items()}
    result = trainer.fit(start, {"round": 1})
    assert isinstance(result, FitResult) and result.num_examples == 20 and "loss" in result.metrics
    assert set(result.weights) == set(start)
    assert all(isinstance(v, np.ndarray) for v in result.weights.values())
    assert all(np.array_equal(start[k], kept[k]) for k in start)
    assert any(not np.array_equal(result.weights[k], start[k]) for k in start)


def test_fedprox_mu_comes_from_the_round_config() -> None:
    data = blobs(40, seed=1)
    far = {k: v + 5.0 for k, v in TorchTrainer(tiny_model()).get_weights().items()}

    def drift(mu: float) -> float:
        trainer = TorchTrainer(tiny_model(), None, None, TensorBatches(data, 8, seed=0))
        new = trainer.fit(far, {"round": 1, "mu": mu}).weights
        return sum(float(np.abs(new[k] - far[k]).sum()) for k in far)

    assert drift(10.0) < drift(0.0)


def test_evaluate_reports_loss_metrics_and_poolable_statistics() -> None:
    x, y = blobs(30, seed=2)
    trainer = TorchTrainer(tiny_model(), eval_loader=TensorBatches((x, y), 7, shuffle=False))
    result = trainer.evaluate(trainer.get_weights(), {"round": 1})
    assert isinstance(result, EvalResult) and result.num_examples == 30
    with torch.no_grad():
        want = float(F.cross_entropy(tiny_model()(x), y))
    assert result.loss == pytest.approx(want, rel=1e-5)
    assert result.metrics["log_loss"] == pytest.approx(want, rel=1e-5)
    assert result.stats is not None and int(result.stats["count"][0]) == 30


def test_gradients_of_an_embedding_table_come_as_rows() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(50, 4, sparse=True)
            self.head = nn.Linear(4, 1)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.table(ids).mean(dim=1)).squeeze(-1)

    ids = torch.tensor([[1, 2], [2, 7], [7, 9]])
    labels = torch.tensor([0.0, 1.0, 1.0])
    trainer = TorchTrainer(Bag(), train_loader=TensorBatches((ids, labels), 3, shuffle=False))
    assert sorted(trainer.table_rows("next")["table.weight"].tolist()) == [1, 2, 7, 9]
    result = trainer.gradients(trainer.get_weights(), {"round": 1})
    assert isinstance(result, GradResult) and result.num_examples == 3
    rows = result.gradients["table.weight"]
    assert isinstance(rows, Rows) and sorted(rows.indices.tolist()) == [1, 2, 7, 9]
    assert rows.values.shape == (4, 4)
    assert isinstance(result.gradients["head.weight"], np.ndarray)


@pytest.mark.integration  # end to end (parties over gRPC, or subprocesses): `make test`, not `make test-unit`
def test_a_trainer_without_gradients_is_refused_by_sgd_strategies() -> None:
    class RoundsOnly:
        def fit(self, weights: Any, config: Any) -> FitResult:
            raise AssertionError("not called")

        def evaluate(self, weights: Any, config: Any) -> EvalResult:
            raise AssertionError("not called")

    server = attested_server()
    ps = ParameterServer(server, make_strategy("sync-sgd", tiny_model()), workers=["a"], total=1,
                         round_timeout_s=5, quorum_timeout_s=1)  # fmt: skip
    fed = Federation(server, ps)
    fed.worker("a", lambda c: Worker(c, RoundsOnly(), evaluates=False))
    with pytest.raises(Exception):  # noqa: B017 (the type is checked on the worker's own error below)
        fed.run()
    assert isinstance(fed.errors["a"], UsageError)
    assert "needs per-step gradients" in str(fed.errors["a"])


def test_builtin_trainer_checks_its_settings() -> None:
    with pytest.raises(UsageError, match="batch_size must be an int >= 1"):
        builtin_trainer(tiny_model(), blobs(8, seed=0), batch_size=0)
    with pytest.raises(UsageError, match="SGD needs lr > 0"):
        builtin_trainer(tiny_model(), blobs(8, seed=0), batch_size=4, lr=0)
