"""The job's privacy settings against the policy's budget, checked before any training.

Every party runs `check_job_privacy` at start: a policy with a budget needs a job that
spends it with a mechanism for that unit, and a job's target epsilon may not exceed it.
A worker then plans its DP-SGD (`plan_dp_sgd`): the noise multiplier for the whole job's
steps, refused when those steps would spend more than the budget. The parameter server of
a worker-level job plans its DP-FedAvg the same way (`plan_central_dp`), over the planned
rounds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from enclavefl.errors import ConfigError, PrivacyBudgetExceeded
from enclavefl.jobs.config import HflJobConfig, JobConfig, PrivacyConfig
from enclavefl.tee.policy import Policy, PrivacyBudget

__all__ = ["check_job_privacy", "plan_central_dp", "plan_dp_sgd", "planned_dp_sgd_steps", "target_epsilon"]

log = logging.getLogger("enclavefl.jobs")


def check_job_privacy(job: JobConfig, policy: Policy) -> PrivacyBudget | None:
    """The policy's budget when the job's privacy settings fit it; raises otherwise."""
    budget, settings = policy.privacy, job.privacy
    if budget is None:
        if settings is not None:
            raise ConfigError(
                f"privacy: the job uses {settings.mechanism} but the policy {job.policy} has no privacy budget, "
                "so no peer could verify it: add one (enclavefl policy init --max-epsilon E --delta D "
                f"--privacy-unit {settings.unit})"
            )
        return None
    if settings is None:
        raise ConfigError(
            f"privacy: required: the policy {job.policy} enforces a privacy budget ({budget.describe()}); "
            "give the job a privacy section that spends it"
        )
    if settings.unit != budget.unit:
        raise PrivacyBudgetExceeded(
            f"privacy: mechanism {settings.mechanism} protects the {settings.unit} level, "
            f"the policy's budget is {budget.describe()}"
        )
    if settings.target_epsilon is not None and settings.target_epsilon > budget.max_epsilon:
        raise PrivacyBudgetExceeded(
            f"privacy.target_epsilon {settings.target_epsilon:g} exceeds the policy's budget ({budget.describe()})"
        )
    if isinstance(job, HflJobConfig) and job.strategy.rounds is None:
        raise ConfigError(f"privacy: {settings.mechanism} trains in rounds: use fedavg, fedprox or fedadam")
    log.info("privacy budget %s, spent by %s", budget.describe(), settings.mechanism)
    return budget


def target_epsilon(settings: PrivacyConfig, budget: PrivacyBudget) -> float:
    return settings.target_epsilon if settings.target_epsilon is not None else budget.max_epsilon


def planned_dp_sgd_steps(job: HflJobConfig, rows: int) -> int:
    """Optimizer steps a worker with `rows` training rows takes over the whole job."""
    strategy = job.strategy
    assert strategy.rounds is not None
    return strategy.rounds * (strategy.local_epochs or 1) * math.ceil(rows / strategy.batch_size)


def plan_dp_sgd(job: HflJobConfig, budget: PrivacyBudget, model: Any, train: Sequence[Any]) -> Any:
    """A `DpSgd` for this worker, refused when its planned steps exceed the budget.

    Its sampling and noise come from secret randomness, never from the job's seed."""
    from enclavefl.privacy.dpsgd import DpSgd

    settings = job.privacy
    assert settings is not None and settings.max_grad_norm is not None
    steps = planned_dp_sgd_steps(job, int(train[-1].shape[0]))
    dp = DpSgd(
        model,
        train,
        batch_size=job.strategy.batch_size,
        delta=budget.delta,
        planned_steps=steps,
        max_grad_norm=settings.max_grad_norm,
        target_epsilon=None if settings.noise_multiplier is not None else target_epsilon(settings, budget),
        noise_multiplier=settings.noise_multiplier,
        max_epsilon=budget.max_epsilon,
    )
    planned = dp.planned_epsilon()
    if planned > budget.max_epsilon:
        raise PrivacyBudgetExceeded(
            f"privacy: {steps} planned DP-SGD steps at noise multiplier {dp.noise_multiplier:g} and sampling rate "
            f"{dp.sample_rate:.4g} spend epsilon {planned:.3f} ({dp.accountant.name} accountant), more than the "
            f"policy's budget ({budget.describe()}): lower rounds or local_epochs, or raise noise_multiplier"
        )
    log.info(
        "DP-SGD: %d planned steps, noise multiplier %.4f, clipping %g, sampling rate %.4g: epsilon %.3f at delta %g",
        steps,
        dp.noise_multiplier,
        dp.max_grad_norm,
        dp.sample_rate,
        planned,
        budget.delta,
    )
    return dp


def plan_central_dp(job: HflJobConfig, budget: PrivacyBudget) -> Any:
    """The server's `DpFedAvg` strategy, refused when the planned rounds exceed the budget.

    Its worker sampling and noise come from secret randomness, never from the job's seed."""
    from enclavefl.hfl.dp import DpFedAvg

    settings, rounds = job.privacy, job.strategy.rounds
    assert settings is not None and settings.fraction is not None and settings.max_update_norm is not None
    assert rounds is not None
    strategy = DpFedAvg(
        fraction=settings.fraction,
        clip=settings.max_update_norm,
        delta=budget.delta,
        rounds=rounds,
        population=len(job.workers()),
        target_epsilon=None if settings.noise_multiplier is not None else target_epsilon(settings, budget),
        noise_multiplier=settings.noise_multiplier,
        max_epsilon=budget.max_epsilon,
    )
    central = strategy.central
    if not central.fits(rounds):
        raise PrivacyBudgetExceeded(
            f"privacy: {rounds} planned DP-FedAvg rounds at noise multiplier {central.noise_multiplier:g} and worker "
            f"sampling rate {central.fraction:g} spend epsilon {central.planned_epsilon():.3f} "
            f"({central.accountant.name} accountant), more than the policy's budget ({budget.describe()}): "
            "lower strategy.rounds or privacy.fraction, or raise noise_multiplier"
        )
    log.info("DP-FedAvg: %d planned rounds, %d workers sampled at %g, noise multiplier %.4f, clipping %g: "
             "epsilon %.3f at delta %g", rounds, strategy.population, central.fraction, central.noise_multiplier,
             central.clip, central.planned_epsilon(), budget.delta)
    return strategy
