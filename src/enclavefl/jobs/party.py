"""Run one party of a job (`enclavefl party`): attest, then hand over to its role."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from enclavefl.errors import UsageError
from enclavefl.fsutil import atomic_write_bytes
from enclavefl.jobs.config import load_job
from enclavefl.jobs.launcher import RESULT_FILE
from enclavefl.jobs.runtime import PartyRuntime
from enclavefl.net import tune_allocator

log = logging.getLogger("enclavefl.jobs")


def set_torch_threads() -> None:
    """Honour the launcher's per-party thread budget so parties do not oversubscribe cores."""
    threads = os.environ.get("ENCLAVEFL_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


def run_party(job_file: Path, name: str, out_dir: Path | None = None, *, resume: bool = False) -> dict[str, Any] | None:
    """Run party `name` of the job to completion; the coordinator returns (and writes) the result."""
    job_file = Path(job_file).resolve()
    job = load_job(job_file)
    out = Path(out_dir or job.output.dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    set_torch_threads()
    tune_allocator()  # multi-MiB tensor frames: reuse buffers instead of fresh zeroed pages
    runtime = PartyRuntime.create(job, job_file, name, out)
    log.info("party %s (%s) of job %s: %s evidence, mr_enclave %s",
             name, runtime.party.role, job.job.id, runtime.tee, runtime.measurement.mr_enclave.hex()[:12])
    if job.mode == "hfl":
        from enclavefl.jobs import hfl_job as mode_module
    elif job.mode == "vfl":
        from enclavefl.jobs import vfl_job as mode_module
    else:  # the schema admits only the two modes
        raise UsageError(f"unknown mode {job.mode!r}")
    result = mode_module.run_role(runtime, resume=resume)
    if result is not None:
        result["peers"] = runtime.peers_seen
        atomic_write_bytes(out / RESULT_FILE, json.dumps(result, indent=2).encode())
    return result
