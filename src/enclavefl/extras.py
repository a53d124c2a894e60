"""Optional extras: which `pip install 'enclavefl[...]'` a command or a job feature needs.

The core package verifies evidence, writes policies, seals files and scaffolds projects with
only its own dependencies. Training needs the `ml` extra (PyTorch, scikit-learn, matplotlib);
Keras trainers `tf`, differential privacy `dp`, experiment tracking `tracking`. This module is
the one place that knows which is which:

* `EXTRAS`: each extra and the modules it provides (checked with `find_spec`, so checking
  imports nothing heavy);
* `COMMAND_EXTRAS`: what each `enclavefl` command needs whatever its input;
* `JOB_FEATURES`: what a job file needs, by the features it uses (a new feature that needs an
  extra adds one `JobFeature` here);
* `MissingExtra`: the exit-2 error naming the exact install line, raised by `require` and
  made by `missing_extra_for` for an import of an extra's module that failed anyway.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from enclavefl.errors import UsageError

__all__ = [
    "COMMAND_EXTRAS",
    "EXTRAS",
    "JOB_COMMANDS",
    "JOB_FEATURES",
    "Extra",
    "JobFeature",
    "MissingExtra",
    "extras_for_job",
    "import_from_extra",
    "install_line",
    "missing_extra_for",
    "require",
    "require_for_command",
    "require_for_job",
]

DISTRIBUTION = "enclavefl"


@dataclass(frozen=True)
class Extra:
    """One optional extra of the distribution and the top-level modules it installs."""

    name: str
    modules: tuple[str, ...]
    provides: str
    """What it is for, in a few words (shown in the error)."""

    def missing_modules(self) -> list[str]:
        return [m for m in self.modules if importlib.util.find_spec(m) is None]


EXTRAS: Mapping[str, Extra] = {
    extra.name: extra
    for extra in (
        Extra("ml", ("torch", "sklearn", "matplotlib"), "PyTorch training, scikit-learn data and metric plots"),
        Extra("tf", ("keras", "tensorflow"), "Keras/TensorFlow trainers"),
        Extra("dp", ("opacus",), "differentially private training (Opacus)"),
        Extra("tracking", ("tensorboard", "mlflow"), "experiment tracking (TensorBoard, MLflow)"),
    )
}

COMMAND_EXTRAS: Mapping[str, tuple[str, ...]] = {
    "demo": ("ml",),
}
"""Extras a command needs whatever its input (by command path: "demo", "gramine build")."""

JOB_COMMANDS: tuple[str, ...] = ("run", "party", "align", "predict", "gramine build")
"""Commands that run a job file (its JOB_FEATURES decide their extras). `gramine build` is one:
an enclave measures the installed packages, so one built without them could never train."""


@dataclass(frozen=True)
class JobFeature:
    """A feature a job file may use, and the extra it needs when it does."""

    name: str
    extra: str
    used_by: Callable[[Any], bool]
    """Given the validated job config, does the job use the feature?"""


JOB_FEATURES: tuple[JobFeature, ...] = (
    # Every party trains, evaluates or serves a torch model today.
    JobFeature("training", "ml", lambda job: True),
    JobFeature("Keras models (model framework: keras)", "tf", lambda job: job.model.uses_keras()),
    JobFeature("DP-SGD (privacy.mechanism: dp-sgd)", "dp",
               lambda job: getattr(getattr(job, "privacy", None), "mechanism", None) == "dp-sgd"),
    JobFeature("experiment tracking (output.tensorboard, output.mlflow)", "tracking",
               lambda job: bool(getattr(job.output, "tensorboard", False) or getattr(job.output, "mlflow", None))),
)


class MissingExtra(UsageError):
    """An optional extra this command or job needs is not installed (exit 2)."""

    def __init__(self, extras: Iterable[str], *, needed_for: str, missing: Iterable[str] = ()) -> None:
        self.extras = tuple(dict.fromkeys(extras))
        self.extra = self.extras[0]
        self.needed_for = needed_for
        what = "; ".join(f"[{e}] {EXTRAS[e].provides}" for e in self.extras if e in EXTRAS)
        gone = f" ({', '.join(missing)} not importable)" if missing else ""
        super().__init__(f"{needed_for} needs {what}{gone}: install it with: {install_line(self.extras)}")


def install_line(extras: Iterable[str]) -> str:
    """The exact command that installs the extras, e.g. pip install 'enclavefl[ml,dp]'."""
    return f"pip install '{DISTRIBUTION}[{','.join(dict.fromkeys(extras))}]'"


def require(extras: Iterable[str], *, needed_for: str) -> None:
    """Raise MissingExtra naming every extra in `extras` whose modules are not all importable."""
    missing: dict[str, list[str]] = {}
    for name in dict.fromkeys(extras):
        if name not in EXTRAS:
            raise ValueError(f"unknown extra {name!r} (known: {', '.join(EXTRAS)})")
        gone = EXTRAS[name].missing_modules()
        if gone:
            missing[name] = gone
    if missing:
        raise MissingExtra(missing, needed_for=needed_for, missing=[m for ms in missing.values() for m in ms])


def import_from_extra(module: str, extra: str, *, needed_for: str) -> Any:
    """`import module` after checking that `extra` is installed (MissingExtra otherwise).

    For code that needs an extra only when it runs (a Keras trainer, a Keras model half):
    the core imports such modules at the point of use, never at its own import.
    """
    require([extra], needed_for=needed_for)
    return importlib.import_module(module)


def require_for_command(command: str) -> None:
    require(COMMAND_EXTRAS.get(command, ()), needed_for=f"`enclavefl {command}`")


def extras_for_job(job: Any) -> dict[str, list[str]]:
    """extra -> the job's features that need it, in JOB_FEATURES order."""
    needed: dict[str, list[str]] = {}
    for feature in JOB_FEATURES:
        if feature.used_by(job):
            needed.setdefault(feature.extra, []).append(feature.name)
    return needed


def require_for_job(job: Any, job_file: object) -> None:
    needed = extras_for_job(job)
    features = ", ".join(f for names in needed.values() for f in names)
    require(needed, needed_for=f"job {job_file} ({features})")


def missing_extra_for(error: ModuleNotFoundError, *, needed_for: str) -> MissingExtra | None:
    """The MissingExtra behind a failed import of an extra's module; None for any other module."""
    root = (error.name or "").partition(".")[0]
    for extra in EXTRAS.values():
        if root in extra.modules:
            return MissingExtra([extra.name], needed_for=needed_for, missing=[root])
    return None
