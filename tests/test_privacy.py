"""Differential privacy: the accountant against Opacus's, clipping, noise, label DP, budget checks."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from enclavefl.errors import ConfigError, PrivacyBudgetExceeded, UsageError
from enclavefl.jobs.config import parse_job
from enclavefl.jobs.privacy import check_job_privacy, plan_dp_sgd, planned_dp_sgd_steps
from enclavefl.privacy import RdpAccountant, epsilon_for, keep_probability, noise_multiplier_for, randomized_response
from enclavefl.privacy.mechanisms import add_gaussian_noise, clip_to_norm, global_norm
from enclavefl.train.losses import default_loss
from enclavefl.tee.policy import Policy

# Opacus (the [dp] extra; enclavefl.privacy.dpsgd imports it) is imported when the first test of
# this module runs, by the `opacus` fixture below, not at collection (seconds in every worker).
opacus_rdp: Any = None
get_noise_multiplier: Any = None
DpSgd: Any = None
check_model: Any = None
make_private: Any = None


@pytest.fixture(scope="module", autouse=True)
def opacus() -> None:
    global opacus_rdp, get_noise_multiplier, DpSgd, check_model, make_private
    opacus_rdp = pytest.importorskip("opacus.accountants")
    from opacus.accountants.utils import get_noise_multiplier

    from enclavefl.privacy.dpsgd import DpSgd, check_model, make_private

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "delta"),
    [(1.1, 0.01, 3000, 1e-5), (0.8, 0.032, 320, 1e-5), (4.0, 0.001, 10, 1e-6), (1.5, 1.0, 50, 1e-5)],
)
def test_epsilon_equals_opacus_rdp_accountant(sigma: float, q: float, steps: int, delta: float) -> None:
    theirs = opacus_rdp.RDPAccountant()
    for _ in range(steps):
        theirs.step(noise_multiplier=sigma, sample_rate=q)
    ours = RdpAccountant()
    for _ in range(steps):
        ours.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.steps == steps
    assert ours.epsilon(delta) == pytest.approx(theirs.get_epsilon(delta), rel=1e-12)
    assert epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta) == pytest.approx(
        theirs.get_epsilon(delta), rel=1e-12
    )


def test_noise_calibration_equals_opacus() -> None:
    for eps, q, steps in [(3.0, 0.03125, 320)]:
        ours = noise_multiplier_for(target_epsilon=eps, delta=1e-5, sample_rate=q, steps=steps)
        assert ours == get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps)
        spent = epsilon_for(noise_multiplier=ours, sample_rate=q, steps=steps, delta=1e-5)
        assert eps - 0.01 <= spent <= eps


def test_accountant_state_round_trips_and_refuses_another() -> None:
    a = RdpAccountant()
    a.step(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    a.step(noise_multiplier=2.0, sample_rate=0.1)
    b = RdpAccountant()
    b.load_state_dict(a.state_dict())
    assert b.epsilon(1e-5) == a.epsilon(1e-5) and b.steps == 6
    with pytest.raises(UsageError, match="accountant state is for 'prv'"):
        b.load_state_dict({"accountant": "prv", "history": []})
    with pytest.raises(UsageError, match="sampling rate"):
        a.step(noise_multiplier=1.0, sample_rate=1.5)
    assert RdpAccountant().epsilon(1e-5) == 0.0


def test_unreachable_budget_is_a_clear_error() -> None:
    with pytest.raises(UsageError, match="cannot be reached"):
        noise_multiplier_for(target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, steps=10**6)


# --- clipping and noise ----------------------------------------------------------------------


def test_dp_sgd_clips_every_per_sample_gradient() -> None:
    """With no noise, each example's contribution to the summed gradient has norm exactly C
    when its own gradient is larger: identical rows make the sum n * C * unit direction."""
    torch.manual_seed(0)
    x = torch.full((200, 5), 10.0)
    y = torch.ones(200)
    model = nn.Linear(5, 1, bias=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                           target_epsilon=None, noise_multiplier=0.0, delta=1e-5, steps=10, max_grad_norm=0.5)
    expected = private.optimizer.expected_batch_size
    checked = 0
    for xb, yb in private.data_loader:
        if len(yb) == 0:
            continue
        private.optimizer.zero_grad()
        (private.model(xb).reshape(-1) - yb * 1000).pow(2).mean().backward()
        raw = private.model._module.weight.grad_sample.reshape(len(yb), -1).norm(dim=1)
        assert bool((raw > 0.5).all())  # every per-sample gradient needs clipping
        assert private.optimizer.pre_step()
        grad = model.weight.grad.reshape(-1)
        assert float(grad.norm()) * expected / len(yb) == pytest.approx(0.5, rel=1e-5)
        checked += 1
    assert checked >= 5
    assert private.steps == checked


def test_per_sample_norms_bounded_for_varied_rows() -> None:
    """Rows of very different scales: the clipped sum is at most n * C (triangle inequality)
    and small gradients pass unchanged (a batch of tiny rows gives the plain gradient sum)."""
    torch.manual_seed(1)
    scales = torch.logspace(-3, 3, 64).unsqueeze(1)
    x = torch.randn(64, 8) * scales
    model = nn.Linear(8, 1)
    loader = DataLoader(TensorDataset(x, torch.zeros(64)), batch_size=64)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                           target_epsilon=None, noise_multiplier=0.0, delta=1e-5, steps=1, max_grad_norm=1.0)
    with torch.no_grad():
        model.bias.zero_()
    private.optimizer.zero_grad()
    private.model(x).pow(2).mul(0.5).sum().backward()
    per_sample = torch.cat([p.grad_sample.reshape(64, -1) for p in private.optimizer.params], dim=1)
    clipped_norms = torch.clamp(per_sample.norm(dim=1), max=1.0)
    private.optimizer.expected_batch_size = 1
    private.optimizer.pre_step()
    summed = torch.cat([p.grad.reshape(-1) for p in private.optimizer.params])
    assert float(summed.norm()) <= float(clipped_norms.sum()) + 1e-5
    small = per_sample.norm(dim=1) < 1.0
    assert bool(small.any()) and bool((~small).any())


def test_dp_sgd_noise_std_is_sigma_times_c() -> None:
    """Zero gradients: what the optimizer applies is the noise alone, N(0, (sigma*C)^2) / B."""
    torch.manual_seed(2)
    model = nn.Linear(500, 200, bias=False)
    loader = DataLoader(TensorDataset(torch.zeros(100, 500), torch.zeros(100)), batch_size=10)
    sigma, clip = 1.3, 0.7
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                           target_epsilon=None, noise_multiplier=sigma, delta=1e-5, steps=20, max_grad_norm=clip)
    draws = []
    for xb, _ in private.data_loader:
        private.optimizer.zero_grad()
        private.model(xb).sum().mul(0.0).backward()
        private.optimizer.pre_step()
        draws.append(model.weight.grad.reshape(-1) * private.optimizer.expected_batch_size)
    noise = torch.cat(draws)
    assert noise.numel() >= 500_000
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.05)
    assert abs(float(noise.mean())) < 0.01


def test_worker_update_clipping_bounds_norms() -> None:
    generator = torch.Generator().manual_seed(3)
    for scale in (1e-3, 0.5, 1.0, 7.0, 1e4):
        update = {
            "a": torch.randn(30, generator=generator) * scale,
            "b": torch.randn(4, 5, generator=generator) * scale,
        }
        clipped, norm = clip_to_norm(update, 1.0)
        assert norm == pytest.approx(global_norm(update))
        assert global_norm(clipped) <= 1.0 + 1e-6
        if norm <= 1.0:
            assert all(torch.equal(clipped[k], update[k]) for k in update)
        else:
            assert global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(UsageError, match="NaN"):
        clip_to_norm({"a": torch.tensor([math.nan])}, 1.0)


def test_aggregate_noise_std_is_sigma_times_c() -> None:
    generator = torch.Generator().manual_seed(4)
    sigma, clip = 0.9, 2.0
    noised = add_gaussian_noise({"w": torch.zeros(400_000)}, sigma * clip, generator=generator)["w"]
    assert float(noised.std()) == pytest.approx(sigma * clip, rel=0.05)


# --- models Opacus cannot train --------------------------------------------------------------


def test_model_with_batchnorm_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(
        UsageError, match=r"1 \(BatchNorm1d\): BatchNorm cannot support training with differential privacy"
    ):
        check_model(model)
    check_model(nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 1)))


# --- label DP --------------------------------------------------------------------------------


def test_randomized_response_flips_at_the_stated_rate() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 200_000).astype(np.float32)
    noisy = randomized_response(labels, 2.0, num_classes=2, rng=rng)
    assert noisy.dtype == labels.dtype and set(np.unique(noisy)) <= {0.0, 1.0}
    kept = float(np.mean(noisy == labels))
    assert kept == pytest.approx(math.exp(2) / (1 + math.exp(2)), abs=0.005)
    many = rng.integers(0, 10, 100_000)
    noisy10 = randomized_response(many, 1.0, num_classes=10, rng=rng)
    assert float(np.mean(noisy10 == many)) == pytest.approx(keep_probability(1.0, 10), abs=0.01)
    changed = noisy10[noisy10 != many]
    assert len(np.unique(changed)) == 10  # flips go to every other class
    with pytest.raises(UsageError, match="class labels in 0..1"):
        randomized_response(np.array([0, 2]), 1.0, num_classes=2, rng=rng)


# --- the budget before training --------------------------------------------------------------


def _job(tmp_path: Path, *, privacy: dict | None, budget: dict | None, rounds: int = 10) -> object:
    Policy.from_json({"allow_simulated": True, **({"privacy": budget} if budget else {})}).save(tmp_path / "p.json")
    doc = yaml.safe_load((EXAMPLES / "hfl_default_credit_dp.yaml").read_text())
    doc["policy"] = str(tmp_path / "p.json")
    doc["strategy"]["rounds"] = rounds
    doc["strategy"]["local_epochs"] = 1
    doc.pop("storage")
    if privacy is None:
        doc.pop("privacy")
    else:
        doc["privacy"] = privacy
    return parse_job(doc, base_dir=EXAMPLES)


RECORD_3 = {"unit": "record", "max_epsilon": 3, "delta": 1e-5}


def test_job_privacy_must_match_the_policy(tmp_path: Path) -> None:
    job = _job(tmp_path, privacy={"mechanism": "dp-sgd"}, budget=RECORD_3)
    budget = check_job_privacy(job, Policy.load(job.policy))
    assert budget is not None and budget.max_epsilon == 3
    with pytest.raises(ConfigError, match="privacy: required: the policy .* enforces a privacy budget"):
        job = _job(tmp_path, privacy=None, budget=RECORD_3)
        check_job_privacy(job, Policy.load(job.policy))
    with pytest.raises(ConfigError, match="has no privacy budget"):
        job = _job(tmp_path, privacy={"mechanism": "dp-sgd"}, budget=None)
        check_job_privacy(job, Policy.load(job.policy))
    with pytest.raises(PrivacyBudgetExceeded, match="target_epsilon 4 exceeds the policy's budget") as info:
        job = _job(tmp_path, privacy={"mechanism": "dp-sgd", "target_epsilon": 4}, budget=RECORD_3)
        check_job_privacy(job, Policy.load(job.policy))
    assert info.value.check == "privacy"
    with pytest.raises(PrivacyBudgetExceeded, match="protects the record level"):
        job = _job(tmp_path, privacy={"mechanism": "dp-sgd"}, budget={**RECORD_3, "unit": "worker"})
        check_job_privacy(job, Policy.load(job.policy))
    with pytest.raises(ConfigError, match="randomized-response is for vfl jobs"):
        _job(tmp_path, privacy={"mechanism": "randomized-response"}, budget=RECORD_3)


def test_planned_steps_over_budget_are_refused_before_training(tmp_path: Path) -> None:
    rows = 800
    train = (torch.randn(rows, 23), torch.randint(0, 2, (rows,)).float())
    model = nn.Sequential(nn.Linear(23, 8), nn.ReLU(), nn.Linear(8, 1))
    job = _job(tmp_path, privacy={"mechanism": "dp-sgd", "noise_multiplier": 0.8}, budget=RECORD_3, rounds=50)
    assert planned_dp_sgd_steps(job, rows) == 50 * 4
    with pytest.raises(
        PrivacyBudgetExceeded, match=r"200 planned DP-SGD steps .* spend epsilon .* more than the policy's budget"
    ):
        plan_dp_sgd(job, Policy.load(job.policy).privacy, model, train)
    job = _job(tmp_path, privacy={"mechanism": "dp-sgd"}, budget=RECORD_3, rounds=50)
    dp = plan_dp_sgd(job, Policy.load(job.policy).privacy, model, train)
    assert 2.99 <= dp.planned_epsilon() <= 3.0
    assert dp.fits(200) and not dp.fits(260)


def test_dp_sgd_rounds_spend_what_was_planned() -> None:
    torch.manual_seed(6)
    x = torch.randn(512, 6)
    y = (x[:, 0] > 0).float()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    dp = DpSgd(
        model,
        (x, y),
        batch_size=64,
        delta=1e-5,
        planned_steps=24,
        max_grad_norm=1.0,
        target_epsilon=2.0,
        max_epsilon=2.0,
    )
    losses = []
    for _ in range(3):
        assert dp.fits(dp.steps_per_epoch)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses.append(
            dp.train(
                optimizer,
                epochs=1,
                loss_fn=lambda out, lab: nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), lab),
            )
        )
    assert dp.accountant.steps == 24
    assert 1.99 <= dp.epsilon <= 2.0
    assert not dp.fits(dp.steps_per_epoch)  # a fourth round would exceed the budget
    assert losses[-1] < losses[0]
    report = dp.report()
    assert report["dp_accountant"] == "rdp" and report["dp_steps"] == 24


# --- central (worker-level) DP -----------------------------------------------------------------


def _central(**kwargs: object) -> object:
    from enclavefl.privacy.central import CentralDp

    settings = {"fraction": 0.5, "clip": 1.0, "delta": 1e-5, "rounds": 10, "noise_multiplier": 1.2}
    settings.update(kwargs)
    return CentralDp(**settings, generator=torch.Generator().manual_seed(7))  # type: ignore[arg-type]


def test_central_dp_bounds_every_worker_update() -> None:
    central = _central(noise_multiplier=0.0)
    updates = {f"w{i}": {"a": torch.full((10,), float(10**i)), "b": torch.ones(3) * 10**i} for i in range(-2, 4)}
    mean, metrics = central.aggregate(updates, population=12)
    expected = 0.5 * 12
    # Each worker moves the aggregate by at most clip / (fraction * population).
    for worker, update in updates.items():
        alone, _ = _central(noise_multiplier=0.0).aggregate({worker: update}, population=12)
        assert global_norm(alone) <= 1.0 / expected + 1e-6
    assert metrics["dp_clipped_workers"] == 4  # norms 0.036 and 0.36 pass unclipped
    assert global_norm(mean) <= len(updates) / expected + 1e-6


def test_central_dp_noise_std_and_accounting() -> None:
    central = _central(noise_multiplier=1.2, clip=0.8)
    zeros = {"w": {"x": torch.zeros(200_000)}}
    mean, metrics = central.aggregate(zeros, population=4)
    # noise std on the sum is sigma * clip; the mean divides by fraction * population = 2
    assert float(mean["x"].std()) * 2 == pytest.approx(1.2 * 0.8, rel=0.05)
    theirs = opacus_rdp.RDPAccountant()
    theirs.step(noise_multiplier=1.2, sample_rate=0.5)
    assert metrics["dp_epsilon"] == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-12)
    # Every worker sampled (q = 1): the calibration's bisection is then closed-form per step; the
    # sampled calibration is checked against Opacus's in test_noise_calibration_equals_opacus.
    calibrated = _central(noise_multiplier=None, target_epsilon=2.0, max_epsilon=2.0, rounds=10, fraction=1.0)
    for _ in range(10):
        assert calibrated.fits()
        calibrated.noise_only({"x": torch.zeros(3)}, population=4)
    assert 1.99 <= calibrated.epsilon <= 2.0 and not calibrated.fits()


def test_central_dp_samples_each_worker_with_the_fraction() -> None:
    central = _central(fraction=0.3)
    workers = [f"w{i}" for i in range(100)]
    picked = [len(central.sample(workers)) for _ in range(200)]
    assert np.mean(picked) == pytest.approx(30, rel=0.05)


def test_linear_fast_clipping_equals_opacus() -> None:
    """DpSgd's clipping for stacks of linear layers gives Opacus's clipped sum exactly."""
    from enclavefl.privacy.dpsgd import _LinearClipping

    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    twin = copy.deepcopy(model)
    x, y = torch.randn(40, 7) * 3, torch.randint(0, 2, (40,)).float()
    fast = _LinearClipping.for_model(model)
    assert fast is not None
    loss = fast.step((x, y), default_loss, clip=0.3, std=0.0, expected_batch_size=40, generator=torch.Generator())
    assert loss == pytest.approx(float(default_loss(twin(x), y)))
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    private = make_private(
        twin,
        torch.optim.SGD(twin.parameters(), lr=0.1),
        loader,
        target_epsilon=None,
        noise_multiplier=0.0,
        delta=1e-5,
        steps=1,
        max_grad_norm=0.3,
    )
    private.optimizer.zero_grad()
    default_loss(private.model(x), y).backward()
    private.optimizer.expected_batch_size = 40
    private.optimizer.pre_step()
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4), name
    # Models it cannot handle are left to Opacus.
    assert _LinearClipping.for_model(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))) is None


def test_label_privacy_is_secret_and_reproducible_from_its_sealed_seed() -> None:
    from enclavefl.vfl.leader import LabelPrivacy

    labels = torch.from_numpy(np.random.default_rng(9).integers(0, 2, 5000).astype(np.float32))
    first, second = LabelPrivacy(2.0, 2), LabelPrivacy(2.0, 2)
    assert first.seed_hex != second.seed_hex  # from the OS, not the job seed
    assert "seed" not in repr(first)
    noisy = first.randomize(labels)
    # A resumed leader restores the seed from its sealed checkpoint: the same labels.
    assert torch.equal(first.with_seed(first.seed_hex).randomize(labels), noisy)
    assert not torch.equal(second.randomize(labels), noisy)
    assert float((noisy == labels).float().mean()) == pytest.approx(keep_probability(2.0, 2), abs=0.02)
    assert first.report() == {
        "label_epsilon": 2.0,
        "label_delta": 0.0,
        "label_mechanism": "randomized-response",
        "label_keep_probability": keep_probability(2.0, 2),
    }
