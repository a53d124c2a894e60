"""Experiment tracking: a finished run's parameters, per-round metrics and summary, written to
TensorBoard event files (`output: {tensorboard: true}`) and/or an MLflow tracking URI
(`output: {mlflow: URI}`, `true` for a `file:` store in the output folder).

Both are the optional extra `[tracking]` (enclavefl.extras refuses a job that asks for them
without it, naming the pip command, before any party starts). The coordinator writes them from metrics.jsonl and
its result, so they hold exactly what the run's own outputs hold. Only hyperparameters, model
and strategy names, metric values and public identities cross into them: never keys or key
paths, tokens, policies' contents, data paths or rows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from enclavefl.validate import is_number

__all__ = ["MLFLOW_DIR", "TENSORBOARD_DIR", "job_params", "write_tracking"]

log = logging.getLogger("enclavefl.jobs")

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"

# Numbers of metrics.jsonl records that are worth a curve (per record kind).
_EVAL_METRICS = ("accuracy", "auc", "logloss", "loss")
_ROUND_METRICS = ("examples", "wall_s", "max_compute_s")


def _wanted(job: Any) -> tuple[bool, Any]:
    output = job.output
    return bool(getattr(output, "tensorboard", False)), getattr(output, "mlflow", None)


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif isinstance(value, list | tuple):
        out[prefix] = ",".join(map(str, value))
    elif value is not None:
        out[prefix] = value


def job_params(job: Any) -> dict[str, Any]:
    """The run's parameters: hyperparameters and names only (no storage, keys, policy or data paths)."""
    params: dict[str, Any] = {"job.name": job.job.name, "job.mode": job.mode, "job.seed": job.job.seed,
                              "parties": len(job.parties), "tee.attester": job.tee.attester}
    sections = ("model", "strategy", "evaluation", "preprocess") if job.mode == "hfl" else \
        ("model", "training", "preprocess")
    for section in sections:
        value = getattr(job, section, None)
        if value is None:
            continue
        dumped = value.model_dump(mode="json", exclude_none=True)
        if section == "evaluation":
            dumped.pop("data", None)  # a path to data
        _flat(section, dumped, params)
    return params


def _series(records: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    points: list[tuple[str, int, float]] = []
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        kind = record.get("event", "eval")
        names: tuple[str, ...]
        if kind == "eval":
            names, prefix = _EVAL_METRICS, "validation" if record.get("unit") == "epoch" else "eval"
        elif kind == "party":
            names, prefix = ("loss", "examples", "compute_s", "bytes_sent", "bytes_received"), \
                f"party/{record.get('party', '?')}"
        else:
            names, prefix = _ROUND_METRICS, "train"
        for name in names:
            value = record.get(name)
            if is_number(value):
                points.append((f"{prefix}/{name}", step, float(value)))
    return points


def write_tracking(job: Any, out_dir: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write the run to the trackers the job's output section asks for."""
    tensorboard, mlflow_uri = _wanted(job)
    points = _series(records)
    if tensorboard:
        _tensorboard(out_dir / TENSORBOARD_DIR, job, points, summary)
    if mlflow_uri:
        uri = f"file:{out_dir / MLFLOW_DIR}" if mlflow_uri is True else str(mlflow_uri)
        _mlflow(uri, job, points, summary)


def _final_points(summary: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for which in ("final", "best"):
        for metric, entry in summary.get(which, {}).items():
            out[f"{which}/{metric}"] = float(entry["value"])
    return out


def _tensorboard(log_dir: Path, job: Any, points: list[tuple[str, int, float]], summary: dict[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for tag, step, value in points:
            writer.add_scalar(tag, value, step)
        writer.add_hparams({k: v if isinstance(v, int | float | str | bool) else str(v)
                            for k, v in job_params(job).items()}, _final_points(summary), run_name=".")
        for warning in summary.get("health", {}).get("warnings", []):
            writer.add_text("health", warning)
    finally:
        writer.close()
    log.info("wrote TensorBoard events to %s (tensorboard --logdir %s)", log_dir, log_dir)


def _mlflow(uri: str, job: Any, points: list[tuple[str, int, float]], summary: dict[str, Any]) -> None:
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode behind this switch; a file: URI in
        # the job is an explicit choice of it (and the default: no server, no database).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(job.job.name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(job.job.name)
    run = client.create_run(experiment_id, run_name=job.job.id, tags={"enclavefl.mode": job.mode})
    run_id = run.info.run_id
    status = "FINISHED"
    try:
        for key, value in job_params(job).items():
            client.log_param(run_id, key, value)
        for tag, step, value in points:
            client.log_metric(run_id, tag.replace("/", "."), value, step=step)
        for key, value in _final_points(summary).items():
            client.log_metric(run_id, key.replace("/", "."), value)
        client.log_dict(run_id, _public_summary(summary), "summary.json")
    except Exception:
        status = "FAILED"
        raise
    finally:
        client.set_terminated(run_id, status=status)
    log.info("logged the run to MLflow at %s (experiment %s, run %s)", uri, job.job.name, run_id)


def _public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without local paths (exported model, split file, predictions)."""
    hidden = {"model", "predictions"}
    public = {k: v for k, v in summary.items() if k not in hidden and k != "peers"}
    if isinstance(public.get("split"), dict):
        public["split"] = {k: v for k, v in public["split"].items() if k != "ids_file"}
    return public
