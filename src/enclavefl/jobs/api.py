"""Run one party of a job from Python with your own trainer or strategy object.

`run_worker(trainer, job=..., party=...)` and `serve(strategy, job=..., party=...)` do what
`enclavefl party` does (attest, verify the peers against the job's policy, then train over
the attested channel) with a trainer or strategy built in your script or notebook instead
of the one the job file names. Everything else comes from the job file: addresses, TEE and
policy, rounds, quorum, evaluation, storage. Your code runs in this process, so under
Gramine it is part of the measured enclave like any other code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from enclavefl.jobs.config import HflJobConfig, load_party_job

__all__ = ["run_worker", "serve"]

log = logging.getLogger("enclavefl.jobs")


def run_worker(trainer: Any, *, job: str | Path, party: str, out: str | Path | None = None) -> dict[str, Any]:
    """Run worker `party` of the horizontal job file `job` with `trainer` (fit/evaluate[/gradients]).

    Returns the worker's summary (version reached, contributions, evaluations, traffic).
    """
    runtime, config = _runtime(job, party, out, role="worker")
    from enclavefl.jobs import hfl_job

    return hfl_job.run_worker(runtime, config, trainer=trainer)


def serve(
    strategy: Any = None, *, job: str | Path, party: str | None = None, out: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the parameter server of the horizontal job file `job` with `strategy` (any object with
    the hooks of `enclavefl.hfl.contract`; None: the job's own) until the last round.

    Returns the result the launcher writes as result.json (final metrics, rounds, workers).
    """
    runtime, config = _runtime(job, party, out, role="server")
    from enclavefl.jobs import hfl_job

    runtime.prepare_storage()
    result = hfl_job.run_server(runtime, config, resume=resume, strategy=strategy)
    result["peers"] = runtime.peers_seen
    return result


def _runtime(job: str | Path, party: str | None, out: str | Path | None, *, role: str) -> tuple[Any, HflJobConfig]:
    from enclavefl.jobs.runtime import PartyRuntime

    job_file, config, name = load_party_job(
        job, party, kind=HflJobConfig, role=role, runs="run_worker and serve run horizontal (hfl) jobs"
    )
    out_dir = Path(out or config.output.dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    return PartyRuntime.create(config, job_file, name, out_dir), config
