"""The simulated measurement of a party: the installed package, the job file and the user
code the job can load (what `enclavefl measure --job` prints and every party reports)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from enclavefl.tee.measure import Measurement, simulated_measurement

if TYPE_CHECKING:
    from enclavefl.jobs.config import JobConfig

__all__ = ["job_measurement", "measure_job"]


def job_measurement(job: JobConfig, job_file: Path, *, isv_prod_id: int = 0, isv_svn: int = 0) -> Measurement:
    """The simulated measurement of a party of `job` (loaded from `job_file`): the package,
    the job file and the user code its `module:function` references can load."""
    code = job.job_code().measured()
    return simulated_measurement([job_file], code=code, isv_prod_id=isv_prod_id, isv_svn=isv_svn)


def measure_job(job_file: Path | None, *, isv_prod_id: int = 0, isv_svn: int = 0) -> Measurement:
    """The simulated measurement of this install with the job in `job_file` (None: the
    package alone): exactly what the job's simulated parties report."""
    if job_file is None:
        return simulated_measurement([], isv_prod_id=isv_prod_id, isv_svn=isv_svn)
    # Loaded only for a job: `enclavefl measure` of the package alone starts without it.
    from enclavefl.jobs.config import load_job

    return job_measurement(load_job(job_file), job_file, isv_prod_id=isv_prod_id, isv_svn=isv_svn)
