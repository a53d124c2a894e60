"""What a run's evaluations say: final and best value of each metric, and whether the
model learned anything at all.

A run that never learns must not look like a success: a binary model whose validation
log loss stays at ln 2 and whose AUC stays at 0.5 predicts one constant for every row.
`health_warnings` names such runs and their likely causes; the launcher puts the warnings
in the coordinator's log, on the console and in summary.json.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from enclavefl.train.tasks import HIGHER_IS_BETTER, LOWER_IS_BETTER
from enclavefl.validate import is_number

__all__ = [
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "evaluations",
    "final_and_best",
    "health_warnings",
]

# Evaluations carry one of these; training records (loss only) do not count.
_EVALUATED = ("accuracy", "auc", "logloss", "macro_f1", "r2", "rmse", "mae")

# A loss is "flat" when it moves less than this (relative) over the first evaluations.
FLAT_TOLERANCE = 1e-3
FLAT_EVALUATIONS = 3
# An AUC this close to 0.5 at every evaluation ranks rows no better than a coin.
CHANCE_AUC_BAND = 0.01

_CAUSES = ("likely causes: features on very different or tiny scales (try `preprocess: {standardize: true}`), "
           "a learning rate too low to move or so high it diverges, or labels that do not depend on the features")


def evaluations(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation records of metrics.jsonl (hfl `eval` events, vfl epoch records), in order."""
    return [r for r in records
            if r.get("event", "eval") == "eval" and isinstance(r.get("step"), int)
            and any(_number(r.get(m)) is not None for m in _EVALUATED)]


def _number(value: Any) -> float | None:
    if not is_number(value) or not math.isfinite(value):
        return None
    return float(value)


def final_and_best(records: Sequence[dict[str, Any]], metrics: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{"final": {metric: {value, step}}, "best": {metric: {value, step}}} over the evaluations.

    Best is the highest accuracy/auc/macro_f1/r2 and the lowest logloss/loss/rmse/mae (a user
    metric: the lowest); ties go to the earliest.
    """
    evals = evaluations(records)
    final: dict[str, Any] = {}
    best: dict[str, Any] = {}
    for metric in metrics:
        points = [(r["step"], v) for r in evals if (v := _number(r.get(metric))) is not None]
        if not points:
            continue
        step, value = points[-1]
        final[metric] = {"value": value, "step": step}
        pick = max if metric in HIGHER_IS_BETTER else min
        best_value = pick(v for _, v in points)
        best_step = next(s for s, v in points if v == best_value)
        best[metric] = {"value": best_value, "step": best_step}
    return {"final": final, "best": best}


def health_warnings(records: Sequence[dict[str, Any]]) -> list[str]:
    """Signs that the model never learned: chance AUC, constant predictions, a flat loss."""
    evals = evaluations(records)
    if not evals:
        return []
    warnings: list[str] = []
    unit = evals[-1].get("unit", "round")
    aucs = [v for r in evals if (v := _number(r.get("auc"))) is not None]
    if aucs and all(abs(v - 0.5) <= CHANCE_AUC_BAND for v in aucs):
        warnings.append(
            f"AUC stayed within {CHANCE_AUC_BAND} of 0.5 at all {len(aucs)} evaluation(s) "
            f"(last {aucs[-1]:.4f}): the model ranks rows no better than chance; {_CAUSES}")
    losses = [v for r in evals if (v := _number(r.get("logloss"))) is not None]
    if losses and aucs and all(abs(v - math.log(2)) <= 1e-3 for v in losses):
        warnings.append(
            f"validation log loss is ln 2 = {math.log(2):.4f} at every evaluation: the model predicts "
            f"probability 0.5 for every row (constant predictions); {_CAUSES}")
    if len(losses) >= FLAT_EVALUATIONS:
        first = losses[:FLAT_EVALUATIONS]
        spread = max(first) - min(first)
        if spread <= FLAT_TOLERANCE * max(abs(first[0]), 1e-12):
            warnings.append(
                f"validation log loss is flat over the first {FLAT_EVALUATIONS} evaluations "
                f"({unit}s {evals[0]['step']}..): {first[0]:.6f} to {first[-1]:.6f}; {_CAUSES}")
    return warnings
