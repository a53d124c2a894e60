"""Horizontal jobs: build the parameter server or a worker from the job file and run it.

`prepare` loads and checks a party's data before it attests (labels that cannot train the
job's task stop it there); `run_role` then runs that party.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from enclavefl.errors import ConfigError
from enclavefl.hfl import registry
from enclavefl.fsutil import atomic_write_bytes
from enclavefl.hfl.checkpoint import CheckpointStore
from enclavefl.hfl.contract import check_strategy
from enclavefl.hfl.server import ParameterServer
from enclavefl.hfl.worker import Worker, builtin_trainer, evaluate
from enclavefl.jobs.config import HflJobConfig
from enclavefl.jobs.datasets import PartyData, load_party_data
from enclavefl.jobs.launcher import append_metrics
from enclavefl.jobs.runtime import PartyRuntime
from enclavefl.net.keybroker import BrokerKeySource
from enclavefl.jobs.models import build_job_model
from enclavefl.jobs.refs import resolve_ref
from enclavefl.jobs.tasks import JobTask, check_party_data, first_rows, job_task, output_width
from enclavefl.train.device import resolve_device
from enclavefl.train.tasks import TaskType

log = logging.getLogger("enclavefl.jobs")

__all__ = [
    "Prepared",
    "build_global_model",
    "holdout",
    "job_trainer",
    "make_job_strategy",
    "prepare",
    "run_role",
    "run_server",
    "run_worker",
]


def make_job_strategy(job: HflJobConfig, model: torch.nn.Module) -> Any:
    """The job's strategy: a registry name with its fields from the strategy section, or a user's class."""
    strategy = job.strategy
    if strategy.name in registry.BUILTIN:
        entry = registry.BUILTIN[strategy.name]
        fields = entry.params.model_fields
        params = {name: getattr(strategy, name) for name in fields if getattr(strategy, name, None) is not None}
        return registry.build_strategy(entry, registry.strategy_class(entry), model, params)
    cls = resolve_ref(strategy.name, what="strategy.name", code=job.job_code())
    if not isinstance(cls, type):
        raise ConfigError(f"strategy.name: {strategy.name!r} is not a class")
    entry = registry.entry_for_class(strategy.name, cls)
    unit = "rounds" if entry.kind == "update" else "steps"
    if getattr(strategy, unit) is None:
        raise ConfigError(f"strategy.{unit}: required: {strategy.name} is of kind {entry.kind!r}")
    return registry.build_strategy(entry, cls, model, dict(strategy.params or {}))


def build_global_model(job: HflJobConfig) -> Any:
    """The job's model (a torch module, or a keras.Model for `framework: keras`). Every party
    builds the same initial model from the job seed; the server's copy wins at join."""
    if job.model.uses_keras():
        from enclavefl.train.keras import keras  # the [tf] extra, for Keras jobs only

        keras.utils.set_random_seed(job.job.seed)
    else:
        torch.manual_seed(job.job.seed)
    return build_job_model(job.model, job, what="model.name")


def _server_model(job: HflJobConfig) -> tuple[torch.nn.Module, Any]:
    """What the parameter server aggregates (torch tensors) and the Keras model it evaluates, if any:
    a Keras job's global state is a TorchMirror of the Keras weights, under the same names."""
    model = build_global_model(job)
    if not job.model.uses_keras():
        return model, None
    from enclavefl.train.keras import TorchMirror  # the [tf] extra, for Keras jobs only

    return TorchMirror(model), model


def _keras_evaluate(keras_model: Any, data: PartyData) -> Any:
    """The server's evaluation of a Keras job: the mirrored global state loaded into the Keras model."""
    from enclavefl.train.keras import keras_eval_stats  # the [tf] extra, for Keras jobs only

    if data.labels is None:
        raise ConfigError("evaluation.data needs labels (set `label:`)")
    inputs = [np.ascontiguousarray(x) for x in data.inputs]
    x, y = (inputs[0] if len(inputs) == 1 else inputs), data.labels

    def evaluate_keras(mirror: Any) -> Any:
        mirror.load_into(keras_model)
        return keras_eval_stats(keras_model, x, y)

    return evaluate_keras


def _keras_trainer(job: HflJobConfig, model: Any, data: PartyData, eval_data: PartyData | None) -> Any:
    """The built-in trainer of a Keras job: `model.fit` with the strategy's local SGD settings."""
    from enclavefl.train.keras import KerasTrainer, keras  # the [tf] extra, for Keras jobs only

    def arrays(part: PartyData) -> tuple[Any, np.ndarray]:
        if part.labels is None:
            raise ConfigError("hfl training data needs labels (set `label:` in the party's data)")
        inputs = [np.ascontiguousarray(x) for x in part.inputs]
        return (inputs[0] if len(inputs) == 1 else inputs), part.labels

    strategy = job.strategy
    binary = model.outputs[0].shape[-1] == 1
    loss = (keras.losses.BinaryCrossentropy(from_logits=True) if binary
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    optimizer = keras.optimizers.SGD(strategy.lr, momentum=strategy.momentum,
                                     weight_decay=strategy.weight_decay or None)
    return KerasTrainer(model, loss, optimizer, arrays(data), arrays(eval_data) if eval_data is not None else None,
                        batch_size=strategy.batch_size, local_epochs=strategy.local_epochs or 1, seed=job.job.seed)


def _tensors(data: PartyData) -> tuple[torch.Tensor, ...]:
    labels = data.labels
    if labels is None:
        raise ConfigError("hfl training data needs labels (set `label:` in the party's data)")
    return (*(torch.from_numpy(np.ascontiguousarray(x)) for x in data.inputs), torch.from_numpy(labels))


def holdout(data: PartyData, fraction: float, seed: int) -> tuple[PartyData, PartyData]:
    """(training rows, held-out evaluation rows) of a worker: `fraction` of its rows drawn with `seed`."""
    order = np.random.default_rng(seed).permutation(len(data))
    held = int(round(len(data) * fraction))
    return data.take(np.sort(order[held:])), data.take(np.sort(order[:held]))


@dataclass(frozen=True)
class Prepared:
    """A party's checked rows (worker: training and held-out; server: evaluation data, if any) and the task."""

    task: JobTask
    kind: TaskType | None
    train: PartyData | None = None
    evaluation: PartyData | None = None


def prepare(job: HflJobConfig, name: str, *, task: str = "train", input_path: Path | None = None) -> Prepared:
    """Load party `name`'s rows and check their labels against the job's task (before attesting).

    A worker with the job's own `trainer:` loads its data itself: only the task is resolved.
    """
    del task, input_path  # hfl jobs only train; party.py refuses the rest
    party, the_task, seed = job.party(name), job_task(job), job.job.seed
    train: PartyData | None = None
    if party.role == "server":
        if job.evaluation.where != "server":
            return Prepared(the_task, the_task.type)
        evaluation = load_party_data(job.evaluation.data, seed=seed, code=job.job_code())
    elif job.trainer is not None:
        build_global_model(job)  # its arguments are checked before attesting all the same
        return Prepared(the_task, the_task.type)
    else:
        train = load_party_data(party.data, seed=seed, code=job.job_code())
        evaluation = None
        if job.evaluation.where == "workers":
            train, evaluation = holdout(train, job.evaluation.holdout_fraction or 0.2, seed)
    rows = [d for d in (train, evaluation) if d is not None and len(d)]
    width = _output_width(job, rows[0])
    kind = the_task.resolved(width)
    check_party_data(the_task, kind, rows, width=width)
    return Prepared(the_task, kind, train, evaluation)


def _output_width(job: HflJobConfig, data: PartyData) -> int:
    """Outputs per example of the job's model, from one forward pass on the first row."""
    model = build_global_model(job)
    if not job.model.uses_keras():
        return output_width(model, *first_rows(data))
    out = np.asarray(model([np.ascontiguousarray(x[:1]) for x in data.inputs] if len(data.inputs) > 1
                           else np.ascontiguousarray(data.inputs[0][:1]), training=False))
    return 1 if out.ndim == 1 else int(out.shape[-1])


def run_role(
    runtime: PartyRuntime, prepared: Prepared, *, resume: bool, task: str = "train", write_split: bool = False
) -> dict[str, Any] | None:
    """Run this party (hfl jobs have one task, train); the server returns the job result."""
    job = runtime.job
    assert isinstance(job, HflJobConfig)
    if runtime.party.role == "server":
        return run_server(runtime, job, resume=resume, prepared=prepared)
    run_worker(runtime, job, prepared=prepared, write_split=write_split)
    return None


def _job_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """The job file and summary call log loss `logloss`."""
    return {("logloss" if k == "log_loss" else k): v for k, v in metrics.items()}


def _record(runtime: PartyRuntime, event: dict[str, Any]) -> None:
    """metrics.jsonl rows: `step` is the round or step number, metrics at the top level."""
    record = _job_names({k: v for k, v in event.items() if not isinstance(v, dict | list)})
    record["step"] = event.get("version")
    if event.get("event") == "eval":
        record["unit"] = "round" if runtime.job.strategy.rounds else "step"  # type: ignore[attr-defined]
    append_metrics(runtime.out_dir, record)


def _record_level(runtime: PartyRuntime, job: HflJobConfig) -> bool:
    """Whether this job's workers enforce record-level DP-SGD (worker-level DP is the server's)."""
    return job.privacy is not None and runtime.privacy is not None and job.privacy.mechanism == "dp-sgd"


def _central_dp(runtime: PartyRuntime, job: HflJobConfig) -> bool:
    """Whether this job's parameter server enforces worker-level DP-FedAvg."""
    return job.privacy is not None and runtime.privacy is not None and job.privacy.mechanism == "dp-fedavg"


def job_trainer(
    runtime: PartyRuntime,
    job: HflJobConfig,
    device: torch.device,
    prepared: Prepared | None = None,
    *,
    write_split: bool = False,
) -> tuple[Any, Any]:
    """The worker's trainer: the job's `trainer:` function, or local SGD over the party's data
    (`prepared`, else loaded now; DP-SGD when the job has record-level privacy); and the
    DP-SGD state, if any."""
    private = _record_level(runtime, job)
    if job.trainer is not None:
        if private:
            raise ConfigError("trainer: record-level DP-SGD (privacy:) is enforced by the built-in trainer; "
                              "a job with its own trainer cannot promise it")
        make = resolve_ref(job.trainer, what="trainer", code=job.job_code())
        trainer = make(runtime.party.data, build_global_model(job), device=device)
        if not (callable(getattr(trainer, "fit", None)) and callable(getattr(trainer, "evaluate", None))):
            raise ConfigError(f"trainer: {job.trainer} returned {type(trainer).__name__}, not a trainer "
                              "(an object with fit() and evaluate(); see enclavefl.train.Trainer)")
        return trainer, None
    if prepared is None:
        prepared = prepare(job, runtime.party.name)
    assert prepared.train is not None
    data, held_out = prepared.train, prepared.evaluation
    if held_out is not None:
        if write_split:  # this worker's own file: its held-out ids never leave it
            path = runtime.out_dir / f"validation_ids-{runtime.party.name}.csv"
            atomic_write_bytes(path, ("\n".join(["id", *map(str, held_out.ids.tolist())]) + "\n").encode())
            log.info("wrote the %d held-out ids of %s to %s", len(held_out), runtime.party.name, path)
        runtime.write_party_record(n_train=len(data), n_valid=len(held_out))
    else:
        runtime.write_party_record(n_train=len(data))
    if job.model.uses_keras():
        if private:
            raise ConfigError("privacy: record-level DP-SGD is built for torch models; a Keras job cannot promise it")
        return _keras_trainer(job, build_global_model(job), data, held_out), None
    eval_data = _tensors(held_out) if held_out is not None else None
    strategy = job.strategy
    model, train = build_global_model(job), _tensors(prepared.train)
    privacy = None
    if private:
        from enclavefl.jobs.privacy import plan_dp_sgd

        # Refused here, before connecting, when the planned steps exceed the budget.
        privacy = plan_dp_sgd(job, runtime.privacy, model, train)  # type: ignore[arg-type]
    trainer = builtin_trainer(
        model,
        train,
        batch_size=strategy.batch_size,
        lr=strategy.lr,
        momentum=strategy.momentum,
        weight_decay=strategy.weight_decay,
        local_epochs=strategy.local_epochs or 1,
        eval_data=eval_data,
        seed=job.job.seed,
        device=device,
        privacy=privacy,
        loss_fn=prepared.task.loss,
        task=prepared.kind,
        metrics=prepared.task.metrics,
    )
    return trainer, privacy


def run_server(
    runtime: PartyRuntime, job: HflJobConfig, *, resume: bool, strategy: Any = None, prepared: Prepared | None = None
) -> dict[str, Any]:
    """The parameter server of the job; `strategy` (an object with the strategy hooks) replaces
    the job's strategy section's name and parameters (rounds, quorum and timeouts stay the job's).
    `prepared`: its checked evaluation data (default: loaded now)."""
    if prepared is None:
        prepared = prepare(job, runtime.party.name)
    strategy_cfg = job.strategy
    device = resolve_device(runtime.party.device)
    model, keras_model = _server_model(job)
    central_dp = _central_dp(runtime, job)
    strategy, model = _server_strategy(runtime, job, strategy, model, device, central_dp=central_dp)
    evaluate_fn = _server_evaluate(prepared, keras_model)
    checkpoints = _checkpoint_store(runtime, job)
    server = runtime.server(max_workers=max(16, 4 * len(job.workers())))
    ps = ParameterServer(
        server,
        strategy,
        model=model,
        workers=[w.name for w in job.workers()],
        total=strategy_cfg.rounds or strategy_cfg.steps or 1,
        min_workers=strategy_cfg.min_workers,
        round_timeout_s=strategy_cfg.round_timeout_s,
        evaluate=evaluate_fn,
        eval_every=job.evaluation.every,
        checkpoints=checkpoints,
        checkpoint_every=job.storage.checkpoint_every if job.storage else 1,
        resume=resume,
        on_metrics=lambda event: _record(runtime, event),
    )
    runtime.phase("training")
    try:
        summary = ps.run()
        ps.linger(strategy_cfg.done_grace_s)
    finally:
        for party, peer in server.admitted().items():
            runtime.record_peer(party, peer.claims)
        server.stop(grace_s=2.0)
    if central_dp:
        runtime.write_party_record(privacy=strategy.central.report(),
                                   **({"stopped": summary["stopped"]} if "stopped" in summary else {}))
    return _server_result(job, prepared, summary)


def _server_strategy(
    runtime: PartyRuntime,
    job: HflJobConfig,
    strategy: Any,
    model: torch.nn.Module,
    device: torch.device,
    *,
    central_dp: bool,
) -> tuple[Any, torch.nn.Module]:
    """The server's strategy (the user's, the job's, or DP-FedAvg) and the global model it steps."""
    if central_dp and strategy is not None:
        raise ConfigError("privacy: worker-level DP-FedAvg (privacy.mechanism dp-fedavg) is the server's strategy; "
                          "a server with another strategy cannot promise it")
    if central_dp:
        from enclavefl.jobs.privacy import plan_central_dp

        assert runtime.privacy is not None
        # Refused here, before listening, when the planned rounds exceed the budget.
        return plan_central_dp(job, runtime.privacy), model.to(device)
    if strategy is None:
        model = model.to(device)
        return make_job_strategy(job, model), model
    check_strategy(strategy)
    held = getattr(strategy, "model", None)
    return strategy, held if isinstance(held, torch.nn.Module) else model.to(device)


def _server_evaluate(prepared: Prepared, keras_model: Any) -> Callable[[torch.nn.Module], Any] | None:
    """How the server evaluates the global model on its held-out set (None without one)."""
    if prepared.evaluation is None:
        return None
    eval_data = prepared.evaluation
    if keras_model is not None:
        return _keras_evaluate(keras_model, eval_data)
    eval_tensors = _tensors(eval_data)
    return lambda m: evaluate(m, eval_tensors, task=prepared.kind, user_metrics=prepared.task.metrics)


def _checkpoint_store(runtime: PartyRuntime, job: HflJobConfig) -> CheckpointStore | None:
    """The server's sealed checkpoints, when the job has storage and a key."""
    key = runtime.key_source()
    if job.storage is None or key is None:
        return None
    # A broker: key also keeps the versions sealed with it, which the host cannot roll back.
    freshness = key.versions() if isinstance(key, BrokerKeySource) else None
    return CheckpointStore(job.storage.party_dir(runtime.party.name), key=key, job_id=job.job.id,
                           keep_last=job.storage.keep_last, freshness=freshness)


def _server_result(job: HflJobConfig, prepared: Prepared, summary: dict[str, Any]) -> dict[str, Any]:
    """The job result from the server's summary: the task's final metrics and how the run went."""
    final = summary.get("final_metrics", {})
    metrics = _job_names(final.get(job.evaluation.where) or next(iter(final.values()), {}))
    wanted = set(prepared.task.names) | {"count"}
    return {
        "metrics": {k: v for k, v in metrics.items() if k in wanted or k.endswith("_error")},
        "extra": {
            "task": prepared.kind,
            "strategy": summary.get("strategy", job.strategy.name),
            "rounds": summary.get("version"),
            "resumed_from": summary.get("resumed_from"),
            "rollback_protection": summary.get("rollback_protection"),
            "workers": summary.get("workers"),
        },
        **({"stopped": summary["stopped"]} if "stopped" in summary else {}),
    }


def run_worker(
    runtime: PartyRuntime,
    job: HflJobConfig,
    *,
    trainer: Any = None,
    prepared: Prepared | None = None,
    write_split: bool = False,
) -> dict[str, Any]:
    """A worker of the job with `trainer` (default: the job's `trainer:` or the built-in one over
    `prepared`, its checked rows); its summary."""
    privacy = None
    if trainer is None:
        trainer, privacy = job_trainer(runtime, job, resolve_device(runtime.party.device), prepared,
                                       write_split=write_split)
    elif _record_level(runtime, job):
        raise ConfigError("record-level DP-SGD (privacy:) is enforced by the built-in trainer; "
                          "a worker with its own trainer cannot promise it")
    client = runtime.client()
    runtime.connected(client)
    on_metrics = (lambda event: _record(runtime, event)) if privacy is not None else None
    worker = Worker(client, trainer, on_metrics=on_metrics)
    try:
        summary = worker.run()
    finally:
        client.close()
    if privacy is not None:
        runtime.write_party_record(
            privacy=privacy.report(), **({"stopped": summary["stopped"]} if "stopped" in summary else {})
        )
    return summary
