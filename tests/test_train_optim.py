"""PlainAdam, PlainAdagrad, PlainSGD: torch.optim's arithmetic and state dict format, without torch._dynamo."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from enclavefl.errors import UsageError
from enclavefl.models import mlp
from enclavefl.train.optim import PlainAdagrad, PlainAdam, PlainOptimizer, PlainSGD

# (plain optimizer, its torch.optim twin with foreach=False: the single-tensor CPU update)
PAIRS: dict[str, tuple[Callable[..., PlainOptimizer], Callable[..., torch.optim.Optimizer]]] = {
    "adam": (lambda p: PlainAdam(p, lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01, foreach=False)),
    "adam-decay": (lambda p: PlainAdam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
                   lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2,
                                              foreach=False)),
    "adagrad": (lambda p: PlainAdagrad(p, lr=0.05), lambda p: torch.optim.Adagrad(p, lr=0.05, foreach=False)),
    "adagrad-decay": (lambda p: PlainAdagrad(p, lr=0.05, weight_decay=1e-3),
                      lambda p: torch.optim.Adagrad(p, lr=0.05, weight_decay=1e-3, foreach=False)),
    "sgd": (lambda p: PlainSGD(p, lr=0.05, momentum=0.9),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False)),
}


def _model() -> nn.Module:
    """A small MLP with an extra parameter that never gets a gradient (state indices must still match)."""
    torch.manual_seed(0)
    model = mlp(6, (8, 4), 3)
    model.register_parameter("unused", nn.Parameter(torch.randn(5)))
    return model


def _train(model: nn.Module, optimizer: Any, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _assert_same(a: nn.Module, b: nn.Module, state_a: dict[str, Any], state_b: dict[str, Any]) -> None:
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)
    (group_a,), (group_b,) = state_a["param_groups"], state_b["param_groups"]
    assert group_a.keys() == group_b.keys()
    assert {k: v for k, v in group_a.items() if k != "foreach"} == {k: v for k, v in group_b.items() if k != "foreach"}
    assert state_a["state"].keys() == state_b["state"].keys()
    for index, values in state_a["state"].items():
        assert values.keys() == state_b["state"][index].keys()
        for key, value in values.items():
            other = state_b["state"][index][key]
            assert value.dtype == other.dtype and torch.equal(value, other), (index, key)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_plain_optimizer_is_bit_identical_to_torch_optim(name: str) -> None:
    make_plain, make_torch = PAIRS[name]
    ours, reference = _model(), _model()
    plain, twin = make_plain(list(ours.parameters())), make_torch(list(reference.parameters()))
    _train(ours, plain, 30, seed=1)
    _train(reference, twin, 30, seed=1)
    _assert_same(ours, reference, plain.state_dict(), twin.state_dict())


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_state_dict_round_trips_between_plain_and_torch(name: str) -> None:
    make_plain, make_torch = PAIRS[name]
    ours, reference = _model(), _model()
    plain, twin = make_plain(list(ours.parameters())), make_torch(list(reference.parameters()))
    _train(ours, plain, 7, seed=2)
    _train(reference, twin, 7, seed=2)

    # plain -> torch.optim: a torch optimizer continues from the plain one's checkpoint, and back.
    from_plain, from_torch = copy.deepcopy(ours), copy.deepcopy(reference)
    torch_continues = make_torch(list(from_plain.parameters()))
    torch_continues.load_state_dict(copy.deepcopy(plain.state_dict()))
    plain_continues = make_plain(list(from_torch.parameters()))
    plain_continues.load_state_dict(copy.deepcopy(twin.state_dict()))
    for model, optimizer in ((ours, plain), (reference, twin), (from_plain, torch_continues),
                             (from_torch, plain_continues)):
        _train(model, optimizer, 9, seed=3)
    _assert_same(ours, from_torch, plain.state_dict(), plain_continues.state_dict())
    _assert_same(reference, from_plain, twin.state_dict(), torch_continues.state_dict())
    _assert_same(ours, reference, plain.state_dict(), twin.state_dict())


def test_loading_takes_the_saved_hyper_parameters_as_torch_does() -> None:
    model = _model()
    saved = torch.optim.Adam(model.parameters(), lr=0.5, betas=(0.5, 0.6)).state_dict()
    plain = PlainAdam(model.parameters(), lr=0.01)
    plain.load_state_dict(saved)
    assert plain.group == {"lr": 0.5, "betas": (0.5, 0.6), "eps": 1e-8, "weight_decay": 0}


def test_a_step_number_from_an_old_checkpoint_becomes_a_tensor() -> None:
    model = _model()
    twin = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, twin, 2, seed=4)
    saved = copy.deepcopy(twin.state_dict())
    for values in saved["state"].values():
        values["step"] = float(values["step"])
    plain = PlainAdam(model.parameters(), lr=0.01)
    plain.load_state_dict(saved)
    assert all(torch.equal(s["step"], torch.tensor(2.0)) for s in plain.state.values())


@pytest.mark.parametrize("make", [
    lambda p: PlainAdam(p, lr=0.0),
    lambda p: PlainAdam(p, lr=0.1, betas=(1.0, 0.9)),
    lambda p: PlainAdam(p, lr=0.1, eps=-1.0),
    lambda p: PlainAdam(p, lr=0.1, weight_decay=-0.1),
    lambda p: PlainAdagrad(p, lr=-1.0),
    lambda p: PlainAdagrad(p, lr=0.1, eps=-1e-3),
    lambda p: PlainSGD(p, lr=0.1, momentum=1.0),
    lambda p: PlainSGD(p, lr=float("nan")),
])
def test_bad_hyper_parameters_raise_usage_error(make: Callable[[Any], PlainOptimizer]) -> None:
    with pytest.raises(UsageError):
        make(list(_model().parameters()))


@pytest.mark.parametrize(("change", "message"), [
    (lambda sd: sd["param_groups"][0].update(amsgrad=True), "does not implement"),
    (lambda sd: sd["param_groups"][0].update(params=[0, 1]), "saved for 2 parameters"),
    (lambda sd: sd["param_groups"][0].update(lr=-1.0), "lr > 0"),
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "one parameter group"),
    (lambda sd: sd["state"][1].pop("exp_avg"), "has state"),
    (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(2)), "shape"),
    (lambda sd: sd["state"].update({99: {}}), "does not hold"),
])
def test_a_state_dict_that_does_not_fit_raises_usage_error(change: Callable[[dict[str, Any]], None],
                                                           message: str) -> None:
    model = _model()
    twin = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, twin, 1, seed=5)
    saved = copy.deepcopy(twin.state_dict())
    change(saved)
    with pytest.raises(UsageError, match=message):
        PlainAdam(model.parameters(), lr=0.01).load_state_dict(saved)


def test_adam_refuses_sparse_gradients_before_updating_anything() -> None:
    dense, embedding = nn.Parameter(torch.ones(3)), nn.Embedding(4, 2, sparse=True)
    plain = PlainAdam([dense, *embedding.parameters()], lr=0.1)
    dense.grad = torch.ones(3)
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(UsageError, match="sparse"):
        plain.step()
    assert torch.equal(dense, torch.ones(3)) and not plain.state


def test_zero_grad_keeps_zeroed_gradients_when_asked() -> None:
    param = nn.Parameter(torch.ones(2))
    plain = PlainAdagrad([param], lr=0.1)
    param.grad = torch.ones(2)
    plain.zero_grad(set_to_none=False)
    assert param.grad is not None and torch.equal(param.grad, torch.zeros(2))
    plain.zero_grad()
    assert param.grad is None
