"""Quick runs of simulated jobs: `ENCLAVEFL_MAX_ROUNDS` and `ENCLAVEFL_MAX_ROWS`.

The examples are sized for real results (minutes to hours); their smoke test, and a user
trying one out, run them as written with fewer rounds (steps, epochs) and fewer rows (the
first N of each csv or Criteo file, before partitioning). The caps apply only to jobs whose
parties use simulated attestation: a real deployment runs what its measured job file says,
never what the host's environment says.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from enclavefl.errors import ConfigError

__all__ = ["MAX_ROUNDS_VARIABLE", "MAX_ROWS_VARIABLE", "apply_quick_caps"]

log = logging.getLogger("enclavefl.jobs")

MAX_ROUNDS_VARIABLE = "ENCLAVEFL_MAX_ROUNDS"
MAX_ROWS_VARIABLE = "ENCLAVEFL_MAX_ROWS"

# (section, field) of every length a job file can give.
_LENGTHS = (("strategy", "rounds"), ("strategy", "steps"), ("training", "epochs"))
# Data kinds that read the first `limit` rows of a file.
_LIMITED_KINDS = ("csv", "criteo")


def _cap(environ: Mapping[str, str], variable: str) -> int | None:
    value = environ.get(variable, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{variable}={value!r}: expected a whole number >= 1")
    return int(value)


def _limited(data: Any, rows: int) -> Any:
    if not isinstance(data, dict) or data.get("kind") not in _LIMITED_KINDS:
        return data
    limit = data.get("limit")
    return {**data, "limit": min(limit, rows) if isinstance(limit, int) else rows}


def apply_quick_caps(data: Any, environ: Mapping[str, str] | None = None) -> Any:
    """The raw job mapping with ENCLAVEFL_MAX_ROUNDS / ENCLAVEFL_MAX_ROWS applied (when set)."""
    environ = os.environ if environ is None else environ
    rounds, rows = _cap(environ, MAX_ROUNDS_VARIABLE), _cap(environ, MAX_ROWS_VARIABLE)
    if (rounds is None and rows is None) or not isinstance(data, dict):
        return data
    tee = data.get("tee")
    if not isinstance(tee, dict) or tee.get("attester") != "simulated":
        log.warning("%s and %s are ignored: they apply only to jobs with simulated attestation",
                    MAX_ROUNDS_VARIABLE, MAX_ROWS_VARIABLE)
        return data
    capped = dict(data)
    if rounds is not None:
        for section, name in _LENGTHS:
            part = capped.get(section)
            if isinstance(part, dict) and isinstance(part.get(name), int) and part[name] > rounds:
                capped[section] = {**part, name: rounds}
    if rows is not None:
        parties = capped.get("parties")
        if isinstance(parties, list):
            capped["parties"] = [
                {**p, "data": _limited(p["data"], rows)} if isinstance(p, dict) and "data" in p else p
                for p in parties
            ]
        evaluation = capped.get("evaluation")
        if isinstance(evaluation, dict) and "data" in evaluation:
            capped["evaluation"] = {**evaluation, "data": _limited(evaluation["data"], rows)}
    return capped
