"""`enclavefl new`: write a small runnable project from a template shipped in the package.

A template is a folder of package data, enclavefl/share/templates/<name>/ (plus the files
every project gets, share/templates/_common/), and a data generator here. The project holds
a job file whose paths are relative to it (so `enclavefl run DIR/job.yaml` works from any
working directory, with no repository checkout), a simulation policy, the user's model code,
small generated data, container files and a README with the commands to run, pin and deploy.

Data is generated with numpy from a fixed seed, never downloaded, so `enclavefl new` needs
only the core install.
"""

from __future__ import annotations

import csv
import re
import shlex
import socket
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np

from enclavefl import __version__
from enclavefl.errors import UsageError

__all__ = ["TEMPLATES", "ProjectTemplate", "create_project", "project_name"]

JOB_FILE = "job.yaml"
_COMMON = "_common"
# Package data cannot hold dotfiles reliably: these are renamed when written.
_RENAMED = {"dockerignore": ".dockerignore", "gitignore": ".gitignore"}
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ProjectTemplate:
    """One `--template`: its files (share/templates/<name>/) and the data it starts with."""

    name: str
    summary: str
    write_data: Callable[[Path, np.random.Generator], None]
    """Write the project's data files under the given data/ folder."""
    extras: tuple[str, ...] = ("ml",)
    """The optional extras its job needs (the container image installs them)."""

    def folder(self) -> Traversable:
        return files("enclavefl").joinpath("share", "templates", self.name)


# --------------------------------------------------------------------------- data


def _write_csv(path: Path, ids: list[str], X: np.ndarray, y: np.ndarray | None) -> None:  # noqa: N803
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", *(["y"] if y is not None else []), *(f"x{i}" for i in range(X.shape[1]))])
        for row, sample in enumerate(ids):
            label = [int(y[row])] if y is not None else []
            writer.writerow([sample, *label, *(f"{v:.5f}" for v in X[row])])


def _binary_task(rng: np.random.Generator, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and a binary label that depends on all of them, with one interaction and noise.

    Learnable (a small MLP reaches an AUC around 0.9) but not trivially separable.
    """
    X = rng.normal(size=(rows, columns))  # noqa: N806
    weights = np.linspace(1.5, -1.0, columns)
    logits = X @ weights + 1.2 * X[:, 0] * X[:, 1] + rng.normal(scale=0.8, size=rows)
    return X, (logits > 0).astype(np.int64)


def _hfl_tabular_data(data: Path, rng: np.random.Generator) -> None:
    """Two workers' training rows and the server's test rows, the same 10 columns."""
    X, y = _binary_task(rng, 1600, 10)  # noqa: N806
    ids = [f"c{i:05d}" for i in range(len(y))]
    for name, rows in (("worker-1", slice(0, 600)), ("worker-2", slice(600, 1200)), ("test", slice(1200, 1600))):
        _write_csv(data / f"{name}.csv", ids[rows], X[rows], y[rows])


def _vfl_tabular_data(data: Path, rng: np.random.Generator) -> None:
    """The leader's label and 5 columns, the follower's 7 columns; 700 of 760/780 ids shared."""
    X, y = _binary_task(rng, 840, 12)  # noqa: N806
    ids = np.array([f"c{i:05d}" for i in range(len(y))])
    # Columns interleaved so that the label needs both halves.
    leader_cols, follower_cols = [0, 2, 4, 6, 8], [1, 3, 5, 7, 9, 10, 11]
    leader_rows = np.arange(0, 760)  # ids 760..839 only the follower holds, 0..59 only the leader
    follower_rows = rng.permutation(np.arange(60, 840))  # the follower's own order: alignment restores it
    _write_csv(data / "leader.csv", list(ids[leader_rows]), X[leader_rows][:, leader_cols], y[leader_rows])
    _write_csv(data / "follower.csv", list(ids[follower_rows]), X[follower_rows][:, follower_cols], None)


TEMPLATES: dict[str, ProjectTemplate] = {
    t.name: t
    for t in (
        ProjectTemplate(
            "hfl-tabular",
            "horizontal FL: a server and two workers with their own rows (FedAvg, own model.py)",
            _hfl_tabular_data,
        ),
        ProjectTemplate(
            "hfl-custom-loop",
            "horizontal FL with your own PyTorch loop (trainer.py: a TorchTrainer)",
            _hfl_tabular_data,
        ),
        ProjectTemplate(
            "vfl-tabular",
            "vertical FL: a leader with labels and a follower with other columns (split model)",
            _vfl_tabular_data,
        ),
        ProjectTemplate(
            "vfl-keras",
            "vertical FL with Keras 3 models (needs the [tf] extra)",
            _vfl_tabular_data,
            extras=("ml", "tf"),
        ),
    )
}


# --------------------------------------------------------------------------- writing


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _render(text: str, values: dict[str, str], source: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise UsageError(f"project template file {source} has an unknown placeholder {{{{{key}}}}}")
        return values[key]

    return _PLACEHOLDER.sub(substitute, text)


def _copy_tree(source: Traversable, target: Path, values: dict[str, str]) -> None:
    for entry in sorted(source.iterdir(), key=lambda e: e.name):
        if entry.name == "__pycache__":
            continue
        destination = target / _RENAMED.get(entry.name, entry.name)
        if entry.is_dir():
            destination.mkdir(exist_ok=True)
            _copy_tree(entry, destination, values)
        else:
            text = _render(entry.read_text(encoding="utf-8"), values, f"{source.name}/{entry.name}")
            destination.write_text(text, encoding="utf-8")


def project_name(directory: Path) -> str:
    """A job name from the directory name (letters, digits, '_', '.', '-'; at most 63)."""
    name = _NAME_CHARS.sub("-", directory.resolve().name).strip("-._")[:63]
    return name or "enclavefl-project"


def create_project(directory: Path, template: str, *, seed: int = 0) -> Path:
    """Write a project from `template` into `directory` (new or empty); returns its job file."""
    if template not in TEMPLATES:
        raise UsageError(
            f"no project template {template!r}: choose one of {', '.join(TEMPLATES)} "
            "(`enclavefl new --list` describes them)"
        )
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UsageError(f"{directory} exists and is not an empty directory: choose a new one")
    chosen = TEMPLATES[template]
    values = {
        "name": project_name(directory),
        "dir": shlex.quote(str(directory)),  # as the user typed it: the README's commands
        "port": str(_free_port()),
        "version": __version__,
        "template": template,
        "extras": ",".join(chosen.extras),
    }
    directory.mkdir(parents=True, exist_ok=True)
    _copy_tree(files("enclavefl").joinpath("share", "templates", _COMMON), directory, values)
    _copy_tree(chosen.folder(), directory, values)
    data = directory / "data"
    data.mkdir(exist_ok=True)
    chosen.write_data(data, np.random.default_rng(seed))
    return directory / JOB_FILE
