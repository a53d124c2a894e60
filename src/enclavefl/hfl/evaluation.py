"""Evaluation on the parameter server's side: the workers' reports of a version, pooled.

Workers that evaluate report their statistics of the versions the server asks for (every
`eval_every` versions and the last). A report is either sufficient statistics (added up
exactly, AUC histograms included: `EvalStats`) or a loss, a number of examples and
metrics (pooled as means weighted by examples). A version's pool settles once every
expected worker reported, left the live set or reported a later version, or at the
timeout; the pooled record then goes to the run's evaluations. The pool holds no lock of
its own: the parameter server calls it under its lock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from enclavefl.errors import UsageError
from enclavefl.hfl import wire
from enclavefl.net.tensors import Message
from enclavefl.train.metrics import EvalStats, aggregate_stats
from enclavefl.validate import is_number

__all__ = ["EvalPool", "Reported", "eval_record", "parse_report", "pool"]

log = logging.getLogger("enclavefl.hfl")


@dataclass(frozen=True)
class Reported:
    """A worker's evaluation without sufficient statistics: its loss and metrics, pooled by examples."""

    examples: int
    loss: float
    metrics: dict[str, float]


Report = EvalStats | Reported


def parse_report(request: Message) -> Report:
    """A worker's evaluation: sufficient statistics (tensors) or loss, examples and metrics (meta)."""
    if request.tensors:
        return EvalStats.from_tensors(
            {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for k, v in request.tensors.items()}
        )
    examples = wire.meta_int(request.meta, "examples", minimum=1)
    loss, metrics = request.meta.get("loss"), request.meta.get("metrics")
    if not is_number(loss) or not math.isfinite(loss):
        raise UsageError(f"evaluation report: loss must be a finite number, got {loss!r}")
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and is_number(v) and math.isfinite(v)
        for k, v in metrics.items()
    ):
        raise UsageError("evaluation report: metrics must map names to finite numbers")
    return Reported(examples, float(loss), {k: float(v) for k, v in metrics.items()})


def pool(reports: list[Report]) -> tuple[dict[str, float], int]:
    """Pooled summary of several workers' evaluations, and the examples they cover."""
    if all(isinstance(r, EvalStats) for r in reports):
        stats = aggregate_stats([r for r in reports if isinstance(r, EvalStats)])
        return stats.summary(), stats.count
    total = 0
    sums: dict[str, float] = {}
    for r in reports:
        summary = r.summary() if isinstance(r, EvalStats) else {"loss": r.loss, **r.metrics}
        count = r.count if isinstance(r, EvalStats) else r.examples
        total += count
        for key, value in summary.items():
            if key != "examples":
                sums[key] = sums.get(key, 0.0) + value * count
    pooled = {key: value / total for key, value in sums.items()}
    pooled["examples"] = float(total)
    return pooled, total


def eval_record(where: str, version: int, metrics: Mapping[str, float], count: int, *, parties: int) -> dict[str, Any]:
    """The evaluation record of metrics.jsonl and the summary (NaN and infinities as None), logged."""
    summary = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    shown = " ".join(f"{k}={v:.4f}" for k, v in summary.items() if v is not None and k != "examples")
    log.info("evaluation at version %d (%s, %d part%s, %d examples): %s",
             version, where, parties, "y" if parties == 1 else "ies", count, shown)  # fmt: skip
    return {"event": "eval", "where": where, "version": version, "parties": parties, **summary}


@dataclass
class _Pending:
    expected: set[str]
    opened_at: float
    reports: dict[str, Report] = field(default_factory=dict)


class EvalPool:
    """The versions whose worker evaluations are awaited, and what arrived for each."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._pending: dict[int, _Pending] = {}
        self._last_key: dict[str, int] = {}

    @property
    def waiting(self) -> bool:
        return bool(self._pending)

    def open(self, version: int, expected: set[str], now: float) -> None:
        if expected:
            self._pending[version] = _Pending(set(expected), now)

    def report(self, worker: str, key: int, report: Report) -> bool:
        """Record `worker`'s report of version `key`; False when nobody waits for it (ignored)."""
        self._last_key[worker] = max(key, self._last_key.get(worker, 0))
        pending = self._pending.get(key)
        if pending is None or worker in pending.reports:
            return False
        pending.reports[worker] = report
        return True

    def settle(self, now: float, live: set[str]) -> list[dict[str, Any]]:
        """Records of the versions whose pool is complete or timed out (oldest first)."""
        records = []
        for key in sorted(self._pending):
            pending = self._pending[key]
            settled = all(
                w in pending.reports or w not in live or self._last_key.get(w, 0) > key for w in pending.expected
            )
            if not settled and now <= pending.opened_at + self._timeout_s:
                continue
            del self._pending[key]
            if pending.reports:
                pooled, count = pool(list(pending.reports.values()))
                records.append(eval_record("workers", key, pooled, count, parties=len(pending.reports)))
            else:
                log.warning("no worker reported its evaluation of version %d", key)
        return records
