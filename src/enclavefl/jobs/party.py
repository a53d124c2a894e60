"""Run one party of a job (`enclavefl party`): attest, then hand over to its role."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from enclavefl.errors import UsageError
from enclavefl.fsutil import atomic_write_bytes
from enclavefl.jobs.config import load_job, metric_name
from enclavefl.jobs.launcher import METRICS_FILE, read_records, result_file
from enclavefl.jobs.results import final_and_best, health_warnings
from enclavefl.jobs.runtime import PartyRuntime
from enclavefl.net import bound_allocator, tune_allocator
from enclavefl.train.device import resolve_device

log = logging.getLogger("enclavefl.jobs")

__all__ = ["run_party", "set_torch_threads"]


def set_torch_threads() -> None:
    """Honour the launcher's per-party thread budget so parties do not oversubscribe cores."""
    threads = os.environ.get("ENCLAVEFL_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


def _role_module(mode: str) -> Any:
    """hfl_job or vfl_job: imported on demand, as each pulls in its own stack."""
    if mode == "hfl":
        from enclavefl.jobs import hfl_job

        return hfl_job
    from enclavefl.jobs import vfl_job

    return vfl_job


def run_party(
    job_file: Path,
    name: str,
    out_dir: Path | None = None,
    *,
    resume: bool = False,
    task: str = "train",
    input_path: Path | None = None,
    write_split: bool = False,
) -> dict[str, Any] | None:
    """Run `task` as party `name` of the job to completion; the coordinator returns (and writes) the result.

    Tasks: train (both modes); align and predict (vertical jobs; predict reads `input_path`).
    """
    job_file = Path(job_file).resolve()
    job = load_job(job_file)
    out = Path(out_dir or job.output.dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    set_torch_threads()
    if job.mode == "hfl" and job.party(name).role == "server":
        bound_allocator()  # many workers' uploads at once: memory near the live model copies
    else:
        tune_allocator()  # multi-MiB tensor frames: reuse buffers instead of fresh zeroed pages
    if job.mode == "hfl" and task != "train":
        raise UsageError(f"{task} is a step of vertical jobs; {job_file} is a horizontal (hfl) job")
    # This party's own inputs are checked before it attests or talks to anyone: its device,
    # its data (and the hfl server's evaluation data), the model's arguments, and the labels
    # against the job's task. A bad file, argument or label is an exit-2 error here.
    resolve_device(job.party(name).device)
    role = _role_module(job.mode)
    prepared = role.prepare(job, name, task=task, input_path=input_path)
    runtime = PartyRuntime.create(job, job_file, name, out)
    key = runtime.key_source()
    if key is not None and not (job.mode == "hfl" and runtime.party.role == "worker"):  # hfl workers keep no state
        key.kek()  # an unreadable key or a refusing broker fails here, not after the first round
    runtime.prepare_storage()
    log.info("party %s (%s) of job %s: %s evidence, mr_enclave %s",
             name, runtime.party.role, job.job.id, runtime.tee, runtime.measurement.mr_enclave.hex()[:12])
    result = role.run_role(runtime, prepared, resume=resume, task=task, write_split=write_split)
    if result is not None:
        result["peers"] = runtime.peers_seen
        if task == "train":
            records = read_records(out / METRICS_FILE)
            _judge(result, records, _metric_names(job))
            if job.output.tensorboard or job.output.mlflow:
                from enclavefl.jobs.tracking import write_tracking

                summary = {"job": job.job.name, "metrics": result.get("metrics", {}), **result.get("extra", {}),
                           **{k: result[k] for k in ("final", "best", "health") if k in result}}
                write_tracking(job, out, records, summary)
        atomic_write_bytes(out / result_file(task), json.dumps(result, indent=2).encode())
    return result


def _metric_names(job: Any) -> tuple[str, ...]:
    """The job's metrics under the names they are reported by (the task's defaults when it names none)."""
    return tuple(metric_name(m) for m in job.metrics())


def _judge(result: dict[str, Any], records: list[dict[str, Any]], metrics: tuple[str, ...]) -> None:
    """Final and best value of every metric, and warnings when the model never learned."""
    result.update(final_and_best(records, metrics))
    warnings = health_warnings(records)
    for warning in warnings:
        log.warning("run health: %s", warning)
    result["health"] = {"warnings": warnings}
