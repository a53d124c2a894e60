"""Vertical jobs: build the leader or a follower from the job file and run one task.

Tasks: `train` (align, train, evaluate every epoch, export each party's half sealed),
`align` (only the alignment, sealed so training reuses it) and `predict` (load the
exported halves and run joint prediction through the bridge on new rows).

`prepare` loads and checks a party's data before it attests (labels that cannot train
the job's task stop it there); `run_role` then runs the task as that party.

Models: `model.bottom` (each follower, and the leader unless leader_bottom is false) and
`model.top` are built-ins or 'package.module:function' returning any torch.nn.Module. A
top model is called with the list of bottom outputs [leader's, followers'...], or, when
its forward takes two arguments, as top(x_leader, follower_activations) (wide&deep).
"""

from __future__ import annotations

import csv
import inspect
import logging
import math
from pathlib import Path
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from enclavefl.errors import ConfigError, UsageError
from enclavefl.fsutil import atomic_write_bytes
from enclavefl.jobs.config import CsvData, ModelSpec, VflJobConfig, WideDeepData
from enclavefl.jobs.datasets import PartyData, load_party_data
from enclavefl.jobs.launcher import append_metrics
from enclavefl.jobs.runtime import PartyRuntime
from enclavefl.jobs.models import build_job_model, model_factory
from enclavefl.models.preprocess import Standardize, fit_standardizers
from enclavefl.net.keybroker import BrokerKeySource
from enclavefl.jobs.refs import check_returned, resolve_ref
from enclavefl.jobs.tasks import JobTask, check_party_data, first_rows, job_task, output_width
from enclavefl.train.losses import LossFn
from enclavefl.train.metrics import MetricFn
from enclavefl.train.optim import PlainAdagrad, PlainAdam, PlainOptimizer, PlainSGD
from enclavefl.train.tasks import TaskType
from enclavefl.validate import is_int
from enclavefl.vfl.align_channel import align_as_follower, align_as_leader
from enclavefl.vfl.export import export_model, load_model
from enclavefl.vfl.follower import Follower, predict_as_follower
from enclavefl.vfl.leader import LabelPrivacy, Leader, SplitMlpLeader, evaluate, predict_as_leader
from enclavefl.vfl.state import OptimizerArg
from enclavefl.vfl.storage import Storage

log = logging.getLogger("enclavefl.jobs")

__all__ = [
    "PREDICTIONS_FILE",
    "TASKS",
    "Prepared",
    "UserCode",
    "build_bottom",
    "build_leader_model",
    "model_path",
    "prepare",
    "run_role",
    "train_follower",
    "train_leader",
]

TASKS = ("train", "align", "predict")
PREDICTIONS_FILE = "predictions.csv"
VALIDATION_IDS_FILE = "validation_ids.csv"


def _write_ids(path: Path, spec: Any, ids: np.ndarray) -> None:
    column = spec.id_column if isinstance(spec, CsvData) else "id"
    text = "\n".join([column, *(str(i) for i in ids.tolist())]) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def model_path(out_dir: Path, party: str) -> Path:
    """Where training exports a party's sealed half and prediction reads it."""
    return out_dir / "model" / f"{party}.sealed"


@dataclass(frozen=True)
class UserCode:
    """What a Python caller brings instead of the job file's (None: the job's own).

    `model`: the leader's model(x_own, follower_activations) or a follower's bottom model;
    `optimizer`: an optimizer or a factory fn(model); `loss(outputs, labels)` (leader);
    `metrics`: name -> fn(outputs, labels) -> float, added to the task's (leader).
    """

    model: nn.Module | None = None
    optimizer: OptimizerArg = None
    loss: LossFn | None = None
    metrics: Mapping[str, MetricFn] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """A party's checked data, and on the leader the job's task (type resolved by the model)."""

    data: PartyData
    task: JobTask
    kind: TaskType | None
    user: UserCode = field(default_factory=UserCode)


def prepare(
    job: VflJobConfig, name: str, *, task: str = "train", input_path: Path | None = None, user: UserCode | None = None
) -> Prepared:
    """Load party `name`'s data for `task` and check its labels against the job's task (before attesting)."""
    if task not in TASKS:
        raise UsageError(f"unknown vfl task {task!r}; one of {list(TASKS)}")
    if task == "predict" and input_path is None:
        raise UsageError(f"predict: party {name} needs an input file (--input)")
    user = user or UserCode()
    data = _party_data(job, name, input_path if task == "predict" else None)
    the_task = job_task(job)
    if job.party(name).role != "leader":
        return Prepared(data, the_task, None, user)
    # A model of the caller's reads activations of a width only it knows: its task is the job's task.type.
    width = None
    if user.model is None:
        width = _leader_output_width(job, build_leader_model(job, data.num_features), data)
    kind = the_task.type if width is None else the_task.resolved(width)
    if kind is not None:
        check_party_data(the_task, kind, [data], width=width)
    return Prepared(data, the_task, kind, user)


def _leader_output_width(job: VflJobConfig, model: nn.Module, data: PartyData) -> int | None:
    """The leader model's outputs per example (None when the followers' activation width is unknown)."""
    x = first_rows(data)[0]
    try:
        width = _bottom_width(job, job.model.bottom, "model.bottom")
    except ConfigError:
        if not isinstance(model, SplitMlpLeader) or model.bottom is None:
            return None
        width = output_width(model.bottom, x)  # followers run the same bottom model
    activations = [torch.zeros(1, width) for _ in job.followers()]
    return output_width(model, x, activations)


def run_role(
    runtime: PartyRuntime, prepared: Prepared, *, resume: bool, task: str = "train", write_split: bool = False
) -> dict[str, Any] | None:
    """Run `task` as this party on its prepared data; the leader returns the job result, followers None."""
    job = runtime.job
    assert isinstance(job, VflJobConfig)
    data = prepared.data
    leader = runtime.party.role == "leader"
    if task == "align":
        if leader:
            return _align_leader(runtime, job, data)
        _align_follower(runtime, job, data)
    elif task == "predict":
        if leader:
            return _predict_leader(runtime, job, prepared)
        _predict_follower(runtime, job, data)
    elif leader:
        return train_leader(runtime, job, prepared, resume=resume, write_split=write_split)
    else:
        train_follower(runtime, job, prepared, resume=resume)
    return None


# --------------------------------------------------------------------------- data and models


def _party_data(job: VflJobConfig, name: str, input_path: Path | None) -> PartyData:
    party = job.party(name)
    spec = party.data
    assert spec is not None  # the job schema requires data on every vfl party
    if input_path is not None:
        input_path = Path(input_path).resolve()
        if isinstance(spec, CsvData):
            label = spec.label if spec.label is not None and spec.label in _csv_header(input_path) else None
            spec = spec.model_copy(update={"path": input_path, "label": label, "limit": None})
        elif isinstance(spec, WideDeepData):  # a party file as make_wide_deep_data writes it
            if not input_path.is_file():
                raise UsageError(f"predict --input: {input_path} does not exist")
            spec = spec.model_copy(update={"path": input_path, "generate": None})
        else:
            raise UsageError(f"predict --input: party {name} has {spec.kind!r} data, which "
                             "cannot be replaced by an input file (csv and wide-deep can)")
    data = load_party_data(spec, seed=job.job.seed)
    if len(data.inputs) != 1:
        raise ConfigError(f"parties[{name}].data: vertical FL takes one feature matrix per party, "
                          f"{spec.kind!r} data gives {len(data.inputs)}")
    if party.role != "leader":
        # A follower never reads labels (a bundled data set has them on every party).
        return PartyData(data.inputs, None, data.ids, data.source, data.label_column)
    if input_path is None and data.labels is None:
        raise ConfigError(f"parties[{name}].data.label: the leader holds the labels")
    return data


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="") as handle:
            return next(csv.reader(handle), [])
    except OSError as exc:
        raise UsageError(f"cannot read input file {path}: {exc.strerror}") from None


def _bottom_width(job: VflJobConfig, spec: ModelSpec, where: str) -> int:
    """The width of a bottom model's activations, from its arguments or its factory's default."""
    if "out_features" in spec.args:
        width = spec.args["out_features"]
        if not is_int(width) or width < 1:
            raise ConfigError(f"{where}.args.out_features: must be an int >= 1, got {width!r}")
        return width
    factory = model_factory(spec, job, what=f"{where}.name")
    parameter = inspect.signature(factory).parameters.get("out_features") if factory else None  # type: ignore[truthy-function]
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise ConfigError(f"{where}.args.out_features: required, the leader sizes its top model by it")
    return int(parameter.default)


def _build_half(job: VflJobConfig, spec: ModelSpec, what: str, seed: int, **args: Any) -> nn.Module:
    """A torch model, or a Keras model inside a KerasHalf (the vfl roles drive both alike)."""
    if spec.uses_keras():
        from enclavefl.vfl.keras_half import KerasHalf, keras  # the [tf] extra, for Keras halves only

        keras.utils.set_random_seed(seed)
        return KerasHalf(build_job_model(spec, job, what=what, **args))
    torch.manual_seed(seed)
    return build_job_model(spec, job, what=what, **args)


def build_bottom(job: VflJobConfig, in_features: int, spec: ModelSpec | None = None) -> nn.Module:
    """A bottom model over `in_features` columns (split MLP bottoms are sized from the data);
    `spec` defaults to the followers' `model.bottom`. With `preprocess.standardize` it first
    scales the party's columns (the statistics are part of its state)."""
    spec = spec or job.model.bottom
    where = "model.bottom" if spec is job.model.bottom else "model.leader_bottom"
    args = dict(spec.args)
    if spec.name == "bottom_mlp":
        args.setdefault("in_features", in_features)
    model = _build_half(job, spec, f"{where}.name", job.job.seed, **args)
    if not job.preprocess.standardize:
        return model
    if spec.uses_keras():
        raise ConfigError(f"preprocess.standardize: {where} is a Keras model; scale the columns in it instead")
    return nn.Sequential(Standardize(in_features), model)


def _fitter(model: nn.Module, X: Any) -> Any:  # noqa: N803
    """The prepare hook: fit the model's Standardize layers on this party's training rows."""
    features = torch.as_tensor(X)
    return lambda rows: fit_standardizers(model, features[torch.from_numpy(rows)])


def _reads_own_features(top: nn.Module) -> bool:
    """A top model with forward(x, follower_activations) reads the leader's columns itself."""
    return len(inspect.signature(top.forward).parameters) == 2


def build_leader_model(job: VflJobConfig, in_features: int) -> nn.Module:
    """The leader's whole model, called as model(x_own, follower_activations) -> logits."""
    followers = len(job.followers())
    own = job.model.leader_bottom_spec
    spec = job.model.top
    args = dict(spec.args)
    # The activation widths are needed only to size a built-in top model (a user's sizes itself).
    if spec.name == "top_mlp":
        own_width = 0
        if own is not None:
            own_width = _bottom_width(job, own, "model.bottom" if own is job.model.bottom else "model.leader_bottom")
        args.setdefault("in_features", _bottom_width(job, job.model.bottom, "model.bottom") * followers + own_width)
    elif spec.name == "wide_deep_leader":
        args.setdefault("follower_dims", [_bottom_width(job, job.model.bottom, "model.bottom")] * followers)
    top = _build_half(job, spec, "model.top.name", job.job.seed + 1, **args)
    if _reads_own_features(top):
        if own is not None:
            raise ConfigError(f"model.leader_bottom: model.top {spec.name!r} reads the leader's own features "
                              "itself (forward(x, follower_activations)); set leader_bottom: false")
        return top
    return SplitMlpLeader(top, build_bottom(job, in_features, own) if own is not None else None)


def _keras_halves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "keras_model")]


def _optimizer(job: VflJobConfig, model: nn.Module) -> Any:
    """The job's optimizer for the half: a torch one, or a KerasOptimizer when the half has Keras parts."""
    training = job.training
    halves = _keras_halves(model)
    params = list(model.parameters())
    if not halves:
        return _torch_optimizer(job, params)
    from enclavefl.vfl.keras_half import KerasOptimizer, keras  # the [tf] extra, for Keras halves only

    def keras_optimizer() -> Any:
        if training.optimizer == "adam":
            return keras.optimizers.Adam(training.lr)
        if training.optimizer == "adagrad":
            return keras.optimizers.Adagrad(training.lr, initial_accumulator_value=0.0)
        return keras.optimizers.SGD(training.lr, momentum=training.momentum)

    torch_optimizer = _torch_optimizer(job, params) if params else None
    return KerasOptimizer([(h, keras_optimizer()) for _, h in halves], torch_optimizer)  # type: ignore[misc]


def _torch_optimizer(
    job: VflJobConfig, params: list[torch.nn.Parameter]
) -> torch.optim.Optimizer | PlainOptimizer:
    """The user's torch optimizer, or a built-in one: torch.optim's arithmetic and state
    dict, without the seconds torch.optim spends importing torch._dynamo in every party."""
    training = job.training
    if ":" in training.optimizer:
        factory = resolve_ref(training.optimizer, what="training.optimizer", code=job.job_code(),
                              expect=torch.optim.Optimizer)
        return check_returned(factory(params, lr=training.lr), torch.optim.Optimizer,
                              what="training.optimizer", ref=training.optimizer)
    if training.optimizer == "adam":
        return PlainAdam(params, lr=training.lr)
    if training.optimizer == "adagrad":
        return PlainAdagrad(params, lr=training.lr)
    return PlainSGD(params, lr=training.lr, momentum=training.momentum)


def _device(runtime: PartyRuntime, model: nn.Module) -> str:
    """The party's `device:`; a half with Keras parts computes on the CPU (TensorFlow keeps its own)."""
    device = runtime.party.device
    if _keras_halves(model):
        if device not in ("auto", "cpu"):
            raise ConfigError(f"parties[{runtime.party.name}].device: {device!r}, but this party's model has Keras "
                              "parts, which run on the CPU here; use device: cpu or auto")
        return "cpu"
    return device


def _storage(runtime: PartyRuntime, job: VflJobConfig) -> Storage | None:
    key = runtime.key_source()
    if job.storage is None or key is None:
        return None
    # A broker: key also keeps the versions sealed with it, which the host cannot roll back.
    freshness = key.versions() if isinstance(key, BrokerKeySource) else None
    return Storage(job.storage.party_dir(runtime.party.name), key, job.job.id, runtime.party.name,
                   checkpoint_every=job.storage.checkpoint_every, keep_last=max(2, job.storage.keep_last),
                   freshness=freshness)


def _record_peers(runtime: PartyRuntime, server: Any) -> None:
    for party, peer in server.admitted().items():
        runtime.record_peer(party, peer.claims)


# --------------------------------------------------------------------------- train


def _job_name(key: str) -> str:
    """A leader record key under the job's metric names (val_log_loss -> logloss)."""
    if key == "train_loss":
        return "loss"
    key = key.removeprefix("val_")
    return "logloss" if key == "log_loss" else key


def _metrics_record(event: dict[str, Any]) -> dict[str, Any]:
    """metrics.jsonl rows: `step` is the epoch, validation metrics under the job's names."""
    record = {_job_name(k): v for k, v in event.items() if not isinstance(v, dict | list)}
    record.update(event="eval", step=event["epoch"], unit="epoch")
    return record


def _label_privacy(runtime: PartyRuntime, job: VflJobConfig) -> LabelPrivacy | None:
    """Randomized response at the job's (budget-checked) label epsilon; classes from the top model."""
    if job.privacy is None or runtime.privacy is None:
        return None
    from enclavefl.jobs.privacy import target_epsilon

    outputs = int(job.model.top.args.get("out_features", 1))
    return LabelPrivacy(target_epsilon(job.privacy, runtime.privacy), 2 if outputs == 1 else outputs)


def _append_epoch(runtime: PartyRuntime, event: dict[str, Any]) -> None:
    """The epoch's evaluation record, then one training record per party (loss, examples,
    compute seconds, bytes), as metrics.jsonl lines."""
    append_metrics(runtime.out_dir, _metrics_record(event))
    for party, figures in event.get("parties", {}).items():
        numbers = {k: v for k, v in figures.items() if isinstance(v, int | float) and not math.isnan(v)}
        append_metrics(runtime.out_dir, {"event": "party", "party": party, "step": event["epoch"],
                                         "unit": "epoch", **numbers})


def train_leader(
    runtime: PartyRuntime,
    job: VflJobConfig,
    prepared: Prepared,
    *,
    resume: bool,
    on_split: Callable[[np.ndarray, np.ndarray], None] | None = None,
    write_split: bool = False,
) -> dict[str, Any]:
    """Train as the leader; returns the job result. `on_split(train_ids, validation_ids)` gets
    the leader's own ids on each side of the validation split once training ends."""
    training = job.training
    data, task, user = prepared.data, prepared.task, prepared.user
    model = user.model if user.model is not None else build_leader_model(job, data.num_features)
    metrics = {**task.metrics, **user.metrics}
    server = runtime.server(max_workers=max(16, 4 * len(job.followers())))
    leader = Leader(
        server,
        followers=[f.name for f in job.followers()],
        X=data.inputs[0],
        y=data.labels,
        ids=data.ids,
        model=model,
        optimizer=user.optimizer or (lambda m: _optimizer(job, m)),
        epochs=training.epochs,
        batch_size=training.batch_size,
        alignment=training.alignment,
        seed=job.job.seed,
        validation_fraction=training.validation_fraction,
        pipeline_depth=training.pipeline_depth,
        storage=_storage(runtime, job),
        resume=resume,
        on_metrics=lambda event: _append_epoch(runtime, event),
        label_privacy=_label_privacy(runtime, job),
        task=prepared.kind,
        loss_fn=user.loss or task.loss,
        metrics=metrics,
        device=_device(runtime, model),
        keep=job.output.keep,
        best_by=_leader_metric(job.output.best_by),
    )
    leader.on_phase = runtime.phase
    if job.preprocess.standardize:
        leader.prepare = _fitter(model, data.inputs[0])
    runtime.phase("aligning")
    server.start()
    try:
        summary = leader.run()
    finally:
        _record_peers(runtime, server)
        server.stop(grace_s=2.0)
    split_file = None
    if write_split:  # the leader's own file: validation ids never leave this party
        split_file = runtime.out_dir / VALIDATION_IDS_FILE
        _write_ids(split_file, runtime.party.data, leader.validation_ids())
        log.info("wrote the %d validation ids to %s", summary["validation_rows"], split_file)
    runtime.phase("exporting")
    exported = _export(runtime, job, model)
    if on_split is not None:
        on_split(*leader.split_ids())
    return _leader_result(job, prepared, summary, split_file=split_file, exported=exported)


def _leader_result(
    job: VflJobConfig, prepared: Prepared, summary: dict[str, Any], *, split_file: Path | None, exported: Path | None
) -> dict[str, Any]:
    """The job result from the leader's summary: final metrics, alignment, the split, the export."""
    training = job.training
    final = _metrics_record(summary["final"]) if summary["final"] else {}
    return {
        "metrics": {k: final[k] for k in (*prepared.task.names, *prepared.user.metrics) if k in final},
        "extra": {
            "task": prepared.kind,
            "alignment": summary["alignment"],
            "intersection": summary["intersection"],
            "train_rows": summary["train_rows"],
            "validation_rows": summary["validation_rows"],
            "split": {
                "n_train": summary["train_rows"],
                "n_valid": summary["validation_rows"],
                "seed": job.job.seed,
                "validation_fraction": training.validation_fraction,
                "drawn": "the first round(n * validation_fraction) entries of "
                         "numpy.random.default_rng((seed, 0x76616C)).permutation(n) over the aligned rows "
                         "in their canonical order (by BLAKE2b-128 of the id): the same rows in every run; "
                         "enclavefl.vfl.plan.validation_split(ids, ...) or --write-split gives them",
                "ids_file": None if split_file is None else str(split_file),
            },
            "epochs": training.epochs,
            "iterations": summary["iterations"],
            "resumed_from": summary["resumed_from"],
            "rollback_protection": summary["rollback_protection"],
            "model": None if exported is None else str(exported),
            "exported": _exported(summary["kept"]),
        },
        **({"privacy": summary["privacy"]} if "privacy" in summary else {}),
    }


def _leader_metric(name: str | None) -> str | None:
    """A job's metric name as the leader's evaluations name it (logloss -> log_loss)."""
    return "log_loss" if name == "logloss" else name


def _exported(kept: dict[str, Any]) -> dict[str, Any]:
    """Which epoch's weights the parties exported: the last, or the best evaluation's (and by what)."""
    if kept["keep"] == "last":
        return {"keep": "last", "epoch": kept["epoch"]}
    return {"keep": "best", "epoch": kept["epoch"], "by": _job_name(kept["metric"]), "value": kept["value"]}


def train_follower(runtime: PartyRuntime, job: VflJobConfig, prepared: Prepared, *, resume: bool) -> None:
    """Train as a follower until the leader says done, then export this party's sealed half."""
    data, user = prepared.data, prepared.user
    model = user.model if user.model is not None else build_bottom(job, data.num_features)
    client = runtime.client()
    runtime.connected(client)
    follower = Follower(
        client,
        X=data.inputs[0],
        ids=data.ids,
        model=model,
        optimizer=user.optimizer or (lambda m: _optimizer(job, m)),
        alignment=job.training.alignment,
        storage=_storage(runtime, job),
        resume=resume,
        device=_device(runtime, model),
    )
    if job.preprocess.standardize:
        follower.prepare = _fitter(model, data.inputs[0])
    try:
        summary = follower.run()
    finally:
        client.close()
    log.info("follower %s: %d iterations over %d aligned samples", runtime.party.name,
             summary["iterations"], summary["intersection"])
    _export(runtime, job, model)


def _export(runtime: PartyRuntime, job: VflJobConfig, model: nn.Module) -> Path | None:
    key = runtime.key_source()
    if key is None:
        log.warning("no storage key in the job: party %s's trained half is not exported "
                    "(add a storage section to keep it and predict later)", runtime.party.name)
        return None
    party = runtime.party.name
    path = export_model(model, model_path(runtime.out_dir, party), key=key, job_id=job.job.id, party=party)
    halves = _keras_halves(model)
    if halves:
        # Keras parts also as native .keras archives (sealed) that Keras users can take away.
        from enclavefl.vfl.keras_half import export_keras  # the [tf] extra, for Keras halves only

        for name, half in halves:
            part = name or "model"
            export_keras(half.keras_model, path.with_name(f"{party}.{part}.keras.sealed"), key=key,
                         job_id=job.job.id, artifact=f"vfl-model/{party}/{part}.keras")
    return path


# --------------------------------------------------------------------------- align


def _align_leader(runtime: PartyRuntime, job: VflJobConfig, data: PartyData) -> dict[str, Any]:
    storage = _storage(runtime, job)
    if storage is None:
        log.warning("no storage section in the job: the alignment is computed but not kept")
    server = runtime.server(max_workers=max(16, 4 * len(job.followers())))
    server.start()
    try:
        aligned = align_as_leader(server, job.training.alignment, data.ids, [f.name for f in job.followers()],
                                  storage=storage)
    finally:
        _record_peers(runtime, server)
        server.stop(grace_s=2.0)
    return {"metrics": {}, "extra": {"task": "align", "alignment": aligned.method,
                                     "intersection": aligned.size, "sealed": storage is not None}}


def _align_follower(runtime: PartyRuntime, job: VflJobConfig, data: PartyData) -> None:
    client = runtime.client()
    runtime.connected(client)
    try:
        aligned = align_as_follower(client, job.training.alignment, data.ids, storage=_storage(runtime, job))
    finally:
        client.close()
    log.info("follower %s: %s alignment of %d samples", runtime.party.name, aligned.method, aligned.size)


# --------------------------------------------------------------------------- predict


def _load_half(runtime: PartyRuntime, job: VflJobConfig, model: nn.Module) -> nn.Module:
    key = runtime.key_source()
    if key is None:
        raise ConfigError("storage.key: predict reads the sealed model halves written by training; "
                          "the job has no storage section")
    path = model_path(runtime.out_dir, runtime.party.name)
    if not path.exists():
        raise UsageError(f"party {runtime.party.name}: no exported model at {path}; run the training first "
                         "(with the same --out)")
    return load_model(model, path, key=key, job_id=job.job.id, party=runtime.party.name)


def _predict_leader(runtime: PartyRuntime, job: VflJobConfig, prepared: Prepared) -> dict[str, Any]:
    data = prepared.data
    model = _load_half(runtime, job, build_leader_model(job, data.num_features))
    out_path = runtime.out_dir / PREDICTIONS_FILE
    server = runtime.server(max_workers=max(16, 4 * len(job.followers())))
    runtime.phase("aligning")
    server.start()
    try:
        predictions = predict_as_leader(
            server,
            followers=[f.name for f in job.followers()],
            X=data.inputs[0],
            ids=data.ids,
            model=model,
            alignment=job.training.alignment,
            out_path=out_path,
            on_phase=runtime.phase,
            task=prepared.kind,
        )
    finally:
        _record_peers(runtime, server)
        server.stop(grace_s=2.0)
    rows = int(predictions.ids.size)
    _record_dropped(runtime, len(data.ids), rows)
    extra: dict[str, Any] = {"task": "predict", "predictions": str(out_path), "rows": rows}
    metrics: dict[str, Any] = {}
    if data.labels is not None:  # labelled input: report how the predictions score
        row_of = {str(i): r for r, i in enumerate(data.ids.tolist())}
        order = np.array([row_of[str(i)] for i in predictions.ids.tolist()], dtype=np.int64)
        labels = torch.as_tensor(data.labels[order])
        scores = evaluate(
            torch.from_numpy(predictions.logits), labels, task=prepared.kind, metrics=prepared.task.metrics
        )
        metrics = {_job_name(k): v for k, v in scores.items()}
    return {"metrics": metrics, "extra": extra}


def _predict_follower(runtime: PartyRuntime, job: VflJobConfig, data: PartyData) -> None:
    model = _load_half(runtime, job, build_bottom(job, data.num_features))
    client = runtime.client()
    runtime.connected(client)
    try:
        summary = predict_as_follower(client, X=data.inputs[0], ids=data.ids, model=model,
                                      alignment=job.training.alignment)
    finally:
        client.close()
    _record_dropped(runtime, len(data.ids), int(summary["intersection"]))


def _record_dropped(runtime: PartyRuntime, input_rows: int, predicted: int) -> None:
    """Rows of this party's input that not every party holds get no prediction: say how many."""
    dropped = input_rows - predicted
    if dropped:
        log.warning("party %s: %d of its %d input rows are not held by every party and get no prediction",
                    runtime.party.name, dropped, input_rows)
    runtime.write_party_record(input_rows=input_rows, dropped_rows=dropped)
