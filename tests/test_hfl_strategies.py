"""Server strategies of horizontal FL: equivalence to single-process training, staleness,
round aggregation, FedAdam against the paper's algorithm, checkpoints and the factory."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from enclavefl.errors import ConfigError, FormatError, UsageError
from enclavefl.hfl.state import buffer_names, embedding_names, load_state, model_state, parameter_names
from enclavefl.hfl.registry import make_strategy
from enclavefl.train.torch import proximal_term as fedprox_penalty
from enclavefl.hfl.strategies import (
    AsyncSGD,
    FedAdam,
    FedAvg,
    FedProx,
    GradContribution,
    NoContributions,
    StaleContribution,
    SyncSGD,
    UpdateContribution,
    grad_contribution,
    sgd,
    update_contribution,
)


# Parties share the two cores: one torch thread each (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def batch(seed: int, size: int, image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((size, 2, 6, 6) if image else (size, 6), generator=g)
    return x, torch.randint(0, 3, (size,), generator=g)


def worker_grads(worker: nn.Module, server: nn.Module, data, name: str, version: int) -> GradContribution:
    """What a sync/async worker does for one batch: pull, forward, mean loss, backward."""
    start = model_state(server)
    load_state(worker, start)
    worker.train()
    worker.zero_grad(set_to_none=True)
    x, y = data
    F.cross_entropy(worker(x), y).backward()
    return grad_contribution(worker, start, worker=name, batch_size=len(x), version=version)


def assert_states_close(a: nn.Module, b: nn.Module, names, atol: float = 1e-6) -> None:
    sa, sb = model_state(a), model_state(b)
    for n in names:
        assert torch.allclose(sa[n], sb[n], atol=atol, rtol=1e-5), (n, (sa[n] - sb[n]).abs().max())


# -- state ------------------------------------------------------------------------


def test_model_state_names_parameters_buffers_and_tables() -> None:
    model = nn.Sequential(nn.Embedding(5, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    model.register_buffer("scratch", torch.zeros(1), persistent=False)
    model[2].bias.requires_grad_(False)
    assert parameter_names(model) == ["0.weight", "1.weight", "1.bias", "2.weight"]
    assert buffer_names(model) == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert embedding_names(model) == {"0.weight"}
    state = model_state(model)
    assert "2.bias" in state and "scratch" not in state
    state["0.weight"].add_(1.0)  # a copy: the model is untouched until loaded
    assert not torch.equal(state["0.weight"], model[0].weight)
    load_state(model, state)
    assert torch.equal(state["0.weight"], model[0].weight)
    with pytest.raises(UsageError, match=r"'1.running_var': expected torch.float32 \[2\], got torch.float64"):
        load_state(model, {**state, "1.running_var": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(UsageError, match=r"missing \['2.bias'\], unexpected \['extra'\]"):
        load_state(model, {**{k: v for k, v in state.items() if k != "2.bias"}, "extra": torch.zeros(1)})


# -- sync-sgd -----------------------------------------------------------------------


def test_sync_sgd_equals_training_on_the_union_batch_mlp() -> None:
    server_model = make_mlp()
    reference = copy.deepcopy(server_model)
    workers = [make_mlp(seed=7), make_mlp(seed=8)]
    factory = sgd(lr=0.1, momentum=0.9, weight_decay=1e-3)
    strategy = SyncSGD(server_model, factory)
    ref_opt = factory(reference)
    for step in range(5):
        data = [batch(100 * step + i, size, image=False) for i, size in enumerate((5, 11))]
        contributions = [
            worker_grads(w, server_model, d, f"w{i}", step) for i, (w, d) in enumerate(zip(workers, data, strict=False))
        ]
        assert strategy.apply_step(contributions) == step + 1
        ref_opt.zero_grad()
        F.cross_entropy(
            reference(torch.cat([d[0] for d in data])), torch.cat([d[1] for d in data])
        ).backward()
        ref_opt.step()
    assert_states_close(server_model, reference, parameter_names(reference))
    assert not torch.allclose(model_state(server_model)["0.weight"], model_state(make_mlp())["0.weight"])


def test_sync_sgd_equals_ghost_batch_norm_training_cnn() -> None:
    """With BatchNorm (train mode) each worker normalizes its own batch, so the single-process
    reference forwards each worker's batch separately and weights the mean losses by size."""
    server_model = make_cnn()
    reference = copy.deepcopy(server_model)
    workers = [make_cnn(seed=7), make_cnn(seed=8)]
    factory = sgd(lr=0.05, momentum=0.9)
    strategy = SyncSGD(server_model, factory)
    ref_opt = factory(reference)
    sizes = (4, 12)
    weights = [s / sum(sizes) for s in sizes]
    bn = server_model[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(4):
        data = [batch(100 * step + i, size, image=True) for i, size in enumerate(sizes)]
        with torch.no_grad():  # what the documented buffer rule must produce for the first BN
            h = [server_model[0](d[0]) for d in data]
            union_mean = torch.cat(h).mean(dim=(0, 2, 3))
            mixed_var = sum(w * hi.var(dim=(0, 2, 3), unbiased=True) for w, hi in zip(weights, h, strict=False))
            mean = 0.9 * mean + 0.1 * union_mean
            var = 0.9 * var + 0.1 * mixed_var
        contributions = [
            worker_grads(w, server_model, d, f"w{i}", step) for i, (w, d) in enumerate(zip(workers, data, strict=False))
        ]
        strategy.apply_step(contributions)
        ref_opt.zero_grad()
        loss = sum(w * F.cross_entropy(reference(x), y) for w, (x, y) in zip(weights, data, strict=False))
        loss.backward()
        ref_opt.step()
    assert_states_close(server_model, reference, parameter_names(reference), atol=1e-5)
    assert torch.allclose(bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(bn.running_var, var, atol=1e-6)
    assert int(bn.num_batches_tracked) == 4
    assert int(server_model[4].num_batches_tracked) == 4


def test_sync_sgd_refuses_bad_contributions() -> None:
    model = make_mlp()
    strategy = SyncSGD(model)
    worker = make_mlp(seed=3)
    good = worker_grads(worker, model, batch(1, 4, image=False), "a", 0)
    with pytest.raises(NoContributions):
        strategy.apply_step([])
    with pytest.raises(UsageError, match="more than one contribution from worker.*'a'"):
        strategy.apply_step([good, good])
    stale = GradContribution("b", 4, good.grads, version=1)
    with pytest.raises(StaleContribution, match="version 1, the server is at version 0") as info:
        strategy.apply_step([good, stale])
    assert (info.value.worker, info.value.version, info.value.server_version) == ("b", 1, 0)
    partial = GradContribution("b", 4, {"0.weight": good.grads["0.weight"]}, 0)
    with pytest.raises(UsageError, match="same names"):
        strategy.apply_step([good, partial])
    with pytest.raises(UsageError, match="unknown parameter 'nope'"):
        strategy.apply_step([GradContribution("b", 4, {"nope": torch.zeros(1)}, 0)])
    with pytest.raises(UsageError, match=r"'0.weight'.*expected torch.float32 \[16, 6\]"):
        strategy.apply_step([GradContribution("b", 4, {"0.weight": torch.zeros(6, 16)}, 0)])
    with pytest.raises(UsageError, match="must be an int >= 1, got 0"):
        strategy.apply_step([GradContribution("b", 0, good.grads, 0)])
    with pytest.raises(UsageError, match="takes GradContribution, got UpdateContribution"):
        strategy.apply_step([UpdateContribution("b", 4, good.grads, 0)])
    assert strategy.version == 0
    assert strategy.apply_step([good]) == 1


def test_server_optimizer_must_hold_every_trainable_parameter() -> None:
    model = make_mlp()
    with pytest.raises(UsageError, match=r"does not hold parameters \['2.bias', '2.weight'\]"):
        SyncSGD(model, lambda m: torch.optim.SGD(m[0].parameters(), lr=0.1))
    with pytest.raises(UsageError, match="more than one server optimizer"):
        SyncSGD(
            model,
            lambda m: [torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD(m[0].parameters(), lr=0.1)],
        )


# -- async-sgd ----------------------------------------------------------------------


def test_async_sgd_without_staleness_equals_sequential_training() -> None:
    server_model = make_mlp()
    reference = copy.deepcopy(server_model)
    worker = make_mlp(seed=5)
    factory = sgd(lr=0.1, momentum=0.5)
    strategy = AsyncSGD(server_model, factory, max_staleness=0)
    ref_opt = factory(reference)
    for step in range(4):
        data = batch(step, 3 + step, image=False)
        result = strategy.apply_gradient(worker_grads(worker, server_model, data, f"w{step % 2}", step))
        assert (result.accepted, result.version, result.staleness, result.weight) == (True, step + 1, 0, 1.0)
        ref_opt.zero_grad()
        F.cross_entropy(reference(data[0]), data[1]).backward()
        ref_opt.step()
    assert_states_close(server_model, reference, parameter_names(reference))


def _advance(strategy: AsyncSGD, model: nn.Module, steps: int) -> None:
    worker = make_mlp(seed=11)
    for step in range(steps):
        assert strategy.apply_gradient(
            worker_grads(worker, model, batch(50 + step, 4, image=False), "x", strategy.version)
        ).accepted


@pytest.mark.parametrize("policy", ["refuse", "down-weight"])
def test_async_sgd_refuses_gradients_beyond_the_staleness_bound(policy: str) -> None:
    model = make_mlp()
    strategy = AsyncSGD(model, sgd(lr=0.1, momentum=0.0), max_staleness=2, staleness_policy=policy)
    old = worker_grads(make_mlp(seed=4), model, batch(9, 4, image=False), "slow", 0)
    _advance(strategy, model, 3)
    before = model_state(model)
    result = strategy.apply_gradient(old)
    assert (result.accepted, result.version, result.staleness, result.weight) == (False, 3, 3, 0.0)
    assert "staleness 3 > max_staleness 2" in result.reason
    after = model_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(("policy", "weight"), [("refuse", 1.0), ("down-weight", 1 / 3)])
def test_async_sgd_staleness_policy_within_the_bound(policy: str, weight: float) -> None:
    model = make_mlp()
    strategy = AsyncSGD(model, sgd(lr=0.1, momentum=0.0), max_staleness=2, staleness_policy=policy)
    _advance(strategy, model, 1)
    stale = worker_grads(make_mlp(seed=4), model, batch(9, 4, image=False), "slow", 1)
    _advance(strategy, model, 2)
    before = model_state(model)
    result = strategy.apply_gradient(stale)
    assert (result.accepted, result.version, result.staleness, result.weight) == (True, 4, 2, weight)
    after = model_state(model)
    for name, grad in stale.grads.items():
        assert torch.allclose(after[name], before[name] - 0.1 * weight * grad, atol=1e-7)


def test_async_sgd_refuses_a_version_from_the_future() -> None:
    model = make_mlp()
    strategy = AsyncSGD(model, max_staleness=3)
    future = worker_grads(make_mlp(seed=4), model, batch(9, 4, image=False), "w", 1)
    with pytest.raises(StaleContribution, match="version 1, the server is at version 0"):
        strategy.apply_gradient(future)


# -- round strategies ---------------------------------------------------------------


def local_round(
    worker: nn.Module, server: nn.Module, data, name: str, version: int, mu: float = 0.0, steps: int = 2
) -> UpdateContribution:
    """What a round-based worker does: pull, a few local SGD steps (with FedProx's term), deltas."""
    start = model_state(server)
    load_state(worker, start)
    worker.train()
    opt = torch.optim.SGD(worker.parameters(), lr=0.05)
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(worker(x), y)
        if mu:
            loss = loss + fedprox_penalty(worker, start, mu)
        loss.backward()
        opt.step()
    return update_contribution(worker, start, worker=name, num_examples=len(x), version=version)


def test_fedavg_is_the_example_weighted_mean_of_worker_models() -> None:
    model = make_cnn()
    strategy = FedAvg(model)
    workers = [make_cnn(seed=s) for s in (1, 2, 3)]
    sizes = (3, 8, 5)
    start_batches = int(model[1].num_batches_tracked)
    contributions = [
        local_round(w, model, batch(i, n, image=True), f"w{i}", 0, steps=i + 1)
        for i, (w, n) in enumerate(zip(workers, sizes, strict=False))
    ]
    assert strategy.apply_round(contributions) == 1
    states = [model_state(w) for w in workers]
    total = sum(sizes)
    got = model_state(model)
    for name in parameter_names(model) + buffer_names(model):
        if name.endswith("num_batches_tracked"):
            assert int(got[name]) == start_batches + 1 + 2 + 3  # every worker's local steps
            continue
        expected = sum(n / total * s[name] for n, s in zip(sizes, states, strict=False))
        assert torch.allclose(got[name], expected, atol=1e-6), name


def test_fedprox_penalty_value_and_gradient() -> None:
    model = make_mlp()
    anchor = model_state(make_mlp(seed=1))
    penalty = fedprox_penalty(model, anchor, mu=0.3)
    expected = 0.15 * sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters())
    assert torch.allclose(penalty, expected)
    penalty.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 0.3 * (p.detach() - anchor[name]), atol=1e-7)
    assert float(fedprox_penalty(model, anchor, mu=0.0).detach()) == 0.0
    with pytest.raises(UsageError, match="mu must be >= 0"):
        fedprox_penalty(model, anchor, mu=-1.0)
    with pytest.raises(UsageError, match="no '0.weight'"):
        fedprox_penalty(model, {}, mu=0.1)


def test_fedprox_server_aggregates_like_fedavg_and_exposes_mu() -> None:
    a, b = make_mlp(), make_mlp()
    fedavg, fedprox = FedAvg(a), FedProx(b, mu=0.5)
    assert (fedavg.configure_round(1, {}), fedprox.configure_round(1, {})) == ({}, {"mu": 0.5})
    workers = [make_mlp(seed=1), make_mlp(seed=2)]
    contributions = [
        local_round(w, b, batch(i, 6, image=False), f"w{i}", 0, mu=0.5) for i, w in enumerate(workers)
    ]
    fedavg.apply_round(contributions)
    fedprox.apply_round(contributions)
    sa, sb = model_state(a), model_state(b)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_fedadam_follows_reddi_algorithm_2() -> None:
    model = make_mlp()
    lr, b1, b2, tau = 0.03, 0.9, 0.99, 1e-3
    strategy = FedAdam(model, lr=lr, beta1=b1, beta2=b2, tau=tau)
    x = {n: t.double().numpy() for n, t in model_state(model).items()}
    m = {n: np.zeros_like(v) for n, v in x.items()}
    v = {n: np.full_like(val, tau**2) for n, val in x.items()}
    rng = np.random.default_rng(0)
    for rnd in range(3):
        sizes = (4, 9)
        deltas = [{n: rng.normal(scale=0.1, size=val.shape) for n, val in x.items()} for _ in sizes]
        contributions = [
            UpdateContribution(f"w{i}", n, {k: torch.tensor(d[k], dtype=torch.float32) for k in d}, rnd)
            for i, (n, d) in enumerate(zip(sizes, deltas, strict=False))
        ]
        strategy.apply_round(contributions)
        for name, value in x.items():
            avg = sum(n * d[name] for n, d in zip(sizes, deltas, strict=False)) / sum(sizes)
            m[name] = b1 * m[name] + (1 - b1) * avg
            v[name] = b2 * v[name] + (1 - b2) * avg**2
            x[name] = value + lr * m[name] / (np.sqrt(v[name]) + tau)
    got = model_state(model)
    for name, value in x.items():
        np.testing.assert_allclose(got[name].double().numpy(), value, rtol=1e-5, atol=1e-6)


def test_round_strategies_refuse_other_rounds_and_empty_rounds() -> None:
    model = make_mlp()
    strategy = FedAvg(model)
    with pytest.raises(NoContributions, match="zero contributions"):
        strategy.apply_round([])
    late = UpdateContribution("w", 3, {"0.bias": torch.zeros(16)}, version=1)
    with pytest.raises(StaleContribution):
        strategy.apply_round([late])
    with pytest.raises(UsageError, match="must be an int >= 1"):
        strategy.apply_round([UpdateContribution("w", -2, {"0.bias": torch.zeros(16)}, version=0)])


# -- checkpoints --------------------------------------------------------------------

HYPER = {
    "sync-sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "async-sgd": {"lr": 0.05, "momentum": 0.9, "max_staleness": 2, "staleness_policy": "down-weight"},
    "fedavg": {},
    "fedprox": {"mu": 0.1},
    "fedadam": {"lr": 0.01},
}


def run_rounds(name: str, rounds: int, checkpoint_after: int | None = None) -> dict:
    model = make_cnn(seed=0)
    strategy = make_strategy(name, model, **HYPER[name])
    workers = [make_cnn(seed=1), make_cnn(seed=2)]
    for rnd in range(rounds):
        if rnd == checkpoint_after:
            blob = io.BytesIO()
            torch.save(strategy.state_dict(), blob)
            blob.seek(0)
            model = make_cnn(seed=99)  # a restarted server: fresh process, other initial weights
            strategy = make_strategy(name, model, **HYPER[name])
            strategy.load_state_dict(torch.load(blob, weights_only=True))
        data = [batch(10 * rnd + i, 5 + 3 * i, image=True) for i in range(2)]
        if isinstance(strategy, SyncSGD):
            strategy.apply_step(
                [
                    worker_grads(w, model, d, f"w{i}", strategy.version)
                    for i, (w, d) in enumerate(zip(workers, data, strict=False))
                ]
            )
        elif isinstance(strategy, AsyncSGD):
            # Both pull the same version; the second gradient arrives one step stale.
            pulled = strategy.version
            grads = [
                worker_grads(w, model, d, f"w{i}", pulled) for i, (w, d) in enumerate(zip(workers, data, strict=False))
            ]
            assert [strategy.apply_gradient(g).staleness for g in grads] == [0, 1]
        else:
            mu = strategy.configure_round(strategy.version + 1, {}).get("mu", 0.0)
            strategy.apply_round(
                [
                    local_round(w, model, d, f"w{i}", strategy.version, mu)
                    for i, (w, d) in enumerate(zip(workers, data, strict=False))
                ]
            )
    return strategy.state_dict()


def assert_identical(a: object, b: object, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.layout == b.layout, path
        assert torch.equal(a.to_dense(), b.to_dense()), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("name", ["sync-sgd", "async-sgd", "fedavg", "fedprox", "fedadam"])
def test_checkpoint_resume_continues_exactly(name: str) -> None:
    uninterrupted = run_rounds(name, 3)
    resumed = run_rounds(name, 3, checkpoint_after=1)
    assert uninterrupted["version"] == (6 if name == "async-sgd" else 3)
    assert_identical(uninterrupted, resumed)
    if name in ("sync-sgd", "async-sgd", "fedadam"):
        assert uninterrupted["server_optimizer"], "the optimizer state must be part of the checkpoint"


def test_built_in_sgd_server_matches_torch_sgd_and_resumes_its_checkpoints() -> None:
    """The job's sync-sgd server steps PlainSGD (no torch._dynamo import): the same model and
    optimizer state as torch.optim.SGD, and a checkpoint written with torch.optim loads."""
    hyper = HYPER["sync-sgd"]
    built_in, server_model = make_strategy("sync-sgd", make_mlp(), **hyper), make_mlp()
    torch_sgd = SyncSGD(server_model, sgd(**hyper))
    assert type(built_in.optimizers[0]).__name__ == "PlainSGD"
    worker = make_mlp(seed=5)

    def step(strategy: SyncSGD, rnd: int) -> None:
        strategy.apply_step([worker_grads(worker, strategy.model, batch(rnd, 8, image=False), "w", strategy.version)])

    for rnd in range(4):
        step(built_in, rnd)
        step(torch_sgd, rnd)
    assert_identical(built_in.state_dict(), torch_sgd.state_dict())
    resumed = make_strategy("sync-sgd", make_mlp(seed=9), **hyper)
    resumed.load_state_dict(copy.deepcopy(torch_sgd.state_dict()))
    for rnd in range(4, 7):
        step(resumed, rnd)
        step(torch_sgd, rnd)
    assert_identical(resumed.state_dict(), torch_sgd.state_dict())


def test_checkpoint_of_other_settings_is_refused() -> None:
    state = make_strategy("fedadam", make_mlp(), lr=0.01).state_dict()
    with pytest.raises(ConfigError, match="lr=0.01 differs from this job's lr=0.02"):
        make_strategy("fedadam", make_mlp(), lr=0.02).load_state_dict(state)
    with pytest.raises(ConfigError, match="strategy 'fedadam', this job runs 'fedavg'"):
        make_strategy("fedavg", make_mlp()).load_state_dict(state)
    sgd_state = make_strategy("sync-sgd", make_mlp(), lr=0.1).state_dict()
    with pytest.raises(ConfigError, match="momentum=0.9 differs from this job's momentum=0.5"):
        make_strategy("sync-sgd", make_mlp(), lr=0.1, momentum=0.5).load_state_dict(sgd_state)
    with pytest.raises(UsageError, match="model state does not match"):
        make_strategy("sync-sgd", make_cnn(), lr=0.1).load_state_dict(sgd_state)
    with pytest.raises(FormatError, match=r"lacks \['version'\]"):
        make_strategy("fedavg", make_mlp()).load_state_dict(
            {k: v for k, v in state.items() if k != "version"}
        )


# -- the factory --------------------------------------------------------------------


def test_make_strategy_builds_each_strategy() -> None:
    model = make_mlp()
    assert isinstance(make_strategy("sync-sgd", model), SyncSGD)
    assert isinstance(make_strategy("async-sgd", model, max_staleness=1), AsyncSGD)
    assert isinstance(make_strategy("fedavg", model), FedAvg)
    assert make_strategy("fedprox", model, mu=0.01).configure_round(1, {}) == {"mu": 0.01}
    adam = make_strategy("fedadam", model, lr=0.1, tau=1e-2)
    assert isinstance(adam, FedAdam) and adam.hyper() == {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-2}
    sync = make_strategy("sync-sgd", model, lr=0.2, momentum=0.0)
    assert sync.optimizers[0].param_groups[0]["lr"] == 0.2


@pytest.mark.parametrize(
    ("name", "hyper", "message"),
    [
        ("fedsgd", {}, "unknown strategy 'fedsgd'"),
        ("fedavg", {"lr": 0.1}, "strategy fedavg: lr: Extra inputs are not permitted"),
        ("sync-sgd", {"lr": 0}, "strategy sync-sgd: lr: Input should be greater than 0"),
        ("sync-sgd", {"lr": "fast"}, "strategy sync-sgd: lr: Input should be a valid number"),
        ("sync-sgd", {"momentum": 1.0}, "strategy sync-sgd: momentum: Input should be less than 1"),
        ("sync-sgd", {"weight_decay": -1e-4}, "weight_decay: Input should be greater than or equal to 0"),
        ("async-sgd", {"max_staleness": -1}, "max_staleness: Input should be greater than or equal to 0"),
        ("async-sgd", {"max_staleness": 2.5}, "max_staleness: Input should be a valid integer"),
        ("async-sgd", {"max_staleness": 2, "staleness_policy": "drop"}, "staleness_policy: Input should be 'refuse'"),
        ("fedprox", {}, "strategy fedprox: mu: Field required"),
        ("fedprox", {"mu": float("nan")}, "mu: Input should be greater than or equal to 0"),
        ("fedadam", {"beta2": 1.0}, "beta2: Input should be less than 1"),
        ("fedadam", {"tau": 0.0}, "tau: Input should be greater than 0"),
        ("pkg_does_not_exist.mod:Strategy", {}, "cannot import it"),
    ],
)
def test_make_strategy_names_the_bad_field(name: str, hyper: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        make_strategy(name, make_mlp(), **hyper)
