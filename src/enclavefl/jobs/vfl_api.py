"""Run one party of a vertical job from Python with your own models, optimizer, loss and metrics.

`lead(job=..., party=..., model=...)` and `follow(job=..., party=..., model=...)` do what
`enclavefl party` does for a vertical job (check the data against the task, attest, verify
the peers against the job's policy, align, train over the attested channel, export the
sealed halves) with PyTorch objects built in your script instead of the ones the job file
names. Everything else comes from the job file: addresses, TEE and policy, data,
alignment, epochs, batch size, storage. Your code runs in this process, so under Gramine
it is part of the measured enclave like any other code. The models are trained in place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from enclavefl.fsutil import atomic_write_bytes
from enclavefl.jobs.config import VflJobConfig, load_party_job
from enclavefl.jobs.launcher import result_file
from enclavefl.train.losses import LossFn
from enclavefl.train.metrics import MetricFn
from enclavefl.vfl.state import OptimizerArg

__all__ = ["follow", "lead"]


def lead(
    *,
    job: str | Path,
    party: str | None = None,
    model: nn.Module | None = None,
    optimizer: OptimizerArg = None,
    loss: LossFn | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the leader of the vertical job file `job` until training ends; returns its result.

    `model` is called as model(x_own, follower_activations) (a list, in the job's follower
    order) and returns outputs [N, 1] or [N, C] (e.g. `enclavefl.vfl.SplitMlpLeader(top,
    bottom)`); with your own model, name the task in the job (`task.type`). `optimizer`: an
    optimizer over the model's parameters or a factory fn(model); `loss(outputs, labels)`
    replaces the task's loss; `metrics` (name -> fn(outputs, labels) -> float) are added
    to every epoch's evaluation. The result (written as result.json under `out`, default
    the job's output.dir) holds the final metrics; the returned dict also holds
    `train_ids` and `validation_ids`, the leader's own ids on each side of the split.
    """
    from enclavefl.jobs import vfl_job

    job_file, config, name, out_dir = _locate(job, party, out, "leader")
    user = vfl_job.UserCode(model, optimizer, loss, dict(metrics or {}))
    prepared = vfl_job.prepare(config, name, user=user)  # the labels are checked before attesting
    runtime = _runtime(config, job_file, name, out_dir)
    split: dict[str, np.ndarray] = {}
    result = vfl_job.train_leader(
        runtime, config, prepared, resume=resume,
        on_split=lambda train, validation: split.update(train_ids=train, validation_ids=validation),
    )  # fmt: skip
    result["peers"] = runtime.peers_seen
    atomic_write_bytes(out_dir / result_file("train"), json.dumps(result, indent=2).encode())
    return {**result, **split}


def follow(
    *,
    job: str | Path,
    party: str,
    model: nn.Module | None = None,
    optimizer: OptimizerArg = None,
    out: str | Path | None = None,
    resume: bool = False,
) -> None:
    """Run follower `party` of the vertical job file `job` until the leader says done.

    `model` maps this party's features [N, F] to the activations it sends the leader;
    `optimizer`: an optimizer over its parameters or a factory fn(model).
    """
    from enclavefl.jobs import vfl_job

    job_file, config, name, out_dir = _locate(job, party, out, "follower")
    prepared = vfl_job.prepare(config, name, user=vfl_job.UserCode(model, optimizer))
    runtime = _runtime(config, job_file, name, out_dir)
    vfl_job.train_follower(runtime, config, prepared, resume=resume)


def _locate(
    job: str | Path, party: str | None, out: str | Path | None, role: str
) -> tuple[Path, VflJobConfig, str, Path]:
    job_file, config, name = load_party_job(
        job, party, kind=VflJobConfig, role=role, runs="lead and follow run vertical (vfl) jobs"
    )
    return job_file, config, name, Path(out or config.output.dir).resolve()


def _runtime(config: VflJobConfig, job_file: Path, name: str, out_dir: Path) -> Any:
    from enclavefl.jobs.runtime import PartyRuntime

    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = PartyRuntime.create(config, job_file, name, out_dir)
    runtime.prepare_storage()
    return runtime
