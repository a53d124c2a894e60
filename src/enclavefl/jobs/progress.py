"""A progress bar over the coordinator's metrics while a job runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from enclavefl.console import stderr_console
from enclavefl.jobs.config import load_job
from enclavefl.jobs.launcher import RunResult, run_job

__all__ = ["planned_steps", "run_with_progress"]


def planned_steps(job: Any) -> tuple[int | None, str]:
    """How many rounds / steps / epochs the job plans, and what they are called."""
    if job.mode == "hfl":
        strategy = job.strategy
        if getattr(strategy, "rounds", None):
            return strategy.rounds, "round"
        return getattr(strategy, "steps", None), "step"
    return job.training.epochs, "epoch"


def _describe(record: dict[str, Any]) -> str:
    names = ("auc", "accuracy", "logloss", "r2", "rmse")
    shown = [f"{k} {record[k]:.4f}" for k in names if isinstance(record.get(k), float)]
    return "  ".join(shown)


def run_with_progress(
    job_file: Path, *, out_dir: Path | None = None, resume: bool = False, write_split: bool = False
) -> RunResult:
    job = load_job(Path(job_file))
    total, unit = planned_steps(job)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[last]}"), TimeElapsedColumn())
    with Progress(*columns, console=stderr_console, transient=False) as progress:
        task = progress.add_task(f"{job.job.name} ({unit}s)", total=total, last="attesting parties…")
        seen_metrics = False

        def on_metrics(record: dict[str, Any]) -> None:
            nonlocal seen_metrics
            step = record.get("step")
            described = _describe(record)
            if isinstance(step, int) and described:
                seen_metrics = True
                progress.update(task, completed=step, last=described)

        def on_phase(phase: str) -> None:
            # attesting -> aligning -> training -> exporting; metrics take over while training.
            if phase != "training" or not seen_metrics:
                progress.update(task, last=f"{phase}…")

        return run_job(job_file, out_dir=out_dir, resume=resume, on_metrics=on_metrics, on_phase=on_phase,
                       write_split=write_split)
