"""Horizontal jobs: build the parameter server or a worker from the job file and run it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from enclavefl.errors import ConfigError
from enclavefl.hfl.checkpoint import CheckpointStore
from enclavefl.hfl.server import ParameterServer
from enclavefl.hfl.strategies import make_strategy
from enclavefl.hfl.worker import Worker, evaluate
from enclavefl.jobs.config import HflJobConfig, StrategyConfig
from enclavefl.jobs.datasets import PartyData, load_party_data
from enclavefl.jobs.launcher import append_metrics
from enclavefl.jobs.runtime import PartyRuntime
from enclavefl.jobs.models import build_job_model

log = logging.getLogger("enclavefl.jobs")

# What each strategy takes from the job's strategy section (job field -> strategy argument).
_SERVER_HYPER: dict[str, dict[str, str]] = {
    "sync-sgd": {"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay"},
    "async-sgd": {"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
                  "max_staleness": "max_staleness", "staleness_policy": "staleness_policy"},
    "fedavg": {},
    "fedprox": {"mu": "mu"},
    "fedadam": {"server_lr": "lr", "beta1": "beta1", "beta2": "beta2", "tau": "tau"},
}


def server_hyper(strategy: StrategyConfig) -> dict[str, Any]:
    mapping = _SERVER_HYPER[strategy.name]
    return {arg: getattr(strategy, field) for field, arg in mapping.items() if getattr(strategy, field) is not None}


def build_global_model(job: HflJobConfig) -> torch.nn.Module:
    # Every party builds the same initial model from the job seed; the server's copy wins at join.
    if job.model.uses_keras():
        # KerasTrainer plugs into the worker once the worker drives a trainer (issue 10);
        # until then say so before anything starts, instead of failing mid-job.
        raise ConfigError("model.framework: keras models run in vertical jobs and through KerasTrainer; "
                          "horizontal jobs built from a job file take torch models for now")
    torch.manual_seed(job.job.seed)
    return build_job_model(job.model, job, what="model.name")


def _tensors(data: PartyData) -> tuple[torch.Tensor, ...]:
    labels = data.labels
    if labels is None:
        raise ConfigError("hfl training data needs labels (set `label:` in the party's data)")
    return (*(torch.from_numpy(np.ascontiguousarray(x)) for x in data.inputs), torch.from_numpy(labels))


def run_role(runtime: PartyRuntime, *, resume: bool) -> dict[str, Any] | None:
    job = runtime.job
    assert isinstance(job, HflJobConfig)
    if runtime.party.role == "server":
        return run_server(runtime, job, resume=resume)
    run_worker(runtime, job)
    return None


def _job_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """The job file and summary call log loss `logloss`."""
    return {("logloss" if k == "log_loss" else k): v for k, v in metrics.items()}


def _record(runtime: PartyRuntime, event: dict[str, Any]) -> None:
    """metrics.jsonl rows: `step` is the round or step number, metrics at the top level."""
    record = _job_names({k: v for k, v in event.items() if not isinstance(v, dict | list)})
    record["step"] = event.get("version")
    if event.get("event") == "eval":
        record["unit"] = "round" if runtime.job.strategy.rounds else "step"
    append_metrics(runtime.out_dir, record)


def run_server(runtime: PartyRuntime, job: HflJobConfig, *, resume: bool) -> dict[str, Any]:
    strategy_cfg = job.strategy
    model = build_global_model(job)
    strategy = make_strategy(strategy_cfg.name, model, **server_hyper(strategy_cfg))
    evaluation = job.evaluation
    evaluate_fn = None
    if evaluation.where == "server":
        eval_tensors = _tensors(load_party_data(evaluation.data, seed=job.job.seed))
        evaluate_fn = lambda m: evaluate(m, eval_tensors)  # noqa: E731 - the server's held-out set
    checkpoints = None
    key = runtime.key_source()
    if job.storage is not None and key is not None:
        checkpoints = CheckpointStore(job.storage.party_dir(runtime.party.name), key=key, job_id=job.job.id,
                                      keep_last=job.storage.keep_last)
    server = runtime.server(max_workers=max(16, 4 * len(job.workers())))
    ps = ParameterServer(
        server,
        strategy,
        workers=[w.name for w in job.workers()],
        total=strategy_cfg.rounds or strategy_cfg.steps or 1,
        min_workers=strategy_cfg.min_workers,
        round_timeout_s=strategy_cfg.round_timeout_s,
        evaluate=evaluate_fn,
        eval_every=evaluation.every,
        checkpoints=checkpoints,
        checkpoint_every=job.storage.checkpoint_every if job.storage else 1,
        resume=resume,
        on_metrics=lambda event: _record(runtime, event),
    )
    try:
        summary = ps.run()
        ps.linger(strategy_cfg.done_grace_s)
    finally:
        for party, peer in server.admitted().items():
            runtime.record_peer(party, peer.claims)
        server.stop(grace_s=2.0)
    final = summary.get("final_metrics", {})
    metrics = _job_names(final.get(evaluation.where) or next(iter(final.values()), {}))
    wanted = set(evaluation.metrics) | {"count"}
    return {
        "metrics": {k: v for k, v in metrics.items() if k in wanted or k.endswith("_error")},
        "extra": {
            "strategy": strategy_cfg.name,
            "rounds": summary.get("version"),
            "resumed_from": summary.get("resumed_from"),
            "workers": summary.get("workers"),
        },
        **({"stopped": summary["stopped"]} if "stopped" in summary else {}),
    }


def run_worker(runtime: PartyRuntime, job: HflJobConfig) -> None:
    data = load_party_data(runtime.party.data, seed=job.job.seed)
    eval_data = None
    if job.evaluation.where == "workers":
        rng = np.random.default_rng(job.job.seed)
        order = rng.permutation(len(data))
        held = int(round(len(data) * (job.evaluation.holdout_fraction or 0.2)))
        eval_data = _tensors(data.take(np.sort(order[:held])))
        data = data.take(np.sort(order[held:]))
    strategy_cfg = job.strategy
    model = build_global_model(job)
    train = _tensors(data)
    privacy = None
    if job.privacy is not None and runtime.privacy is not None:
        from enclavefl.jobs.privacy import plan_dp_sgd

        # Refused here, before connecting, when the planned steps exceed the budget.
        privacy = plan_dp_sgd(job, runtime.privacy, model, train, seed=job.job.seed)
    client = runtime.client()
    runtime.connected(client)
    worker = Worker(
        client,
        model,
        train,
        batch_size=strategy_cfg.batch_size,
        lr=strategy_cfg.lr,
        momentum=strategy_cfg.momentum,
        weight_decay=strategy_cfg.weight_decay,
        local_epochs=strategy_cfg.local_epochs or 1,
        eval_data=eval_data,
        seed=job.job.seed,
        privacy=privacy,
        on_metrics=(lambda event: _record(runtime, event)) if privacy is not None else None,
    )
    try:
        summary = worker.run()
    finally:
        client.close()
    if privacy is not None:
        runtime.write_party_record(privacy=summary["privacy"], **({"stopped": summary["stopped"]} if "stopped" in summary else {}))
