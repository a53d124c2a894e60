"""Turn a job file's data spec into arrays: the glue between jobs/config.py and data/.

Every party loads only its own spec. Features come out float32 (or int64 categorical),
labels int64 for classes or float32 for binary targets, ids as strings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enclavefl.console import download_bar
from enclavefl.data.cifar10 import download_cifar10, load_cifar10, normalize
from enclavefl.data.criteo import load_criteo
from enclavefl.data.partition import partition
from enclavefl.data.synthetic import load_wide_deep_party, make_wide_deep_data
from enclavefl.data.tabular import load_fate_csv, load_sklearn
from enclavefl.errors import UsageError
from enclavefl.jobs.config import (
    Cifar10Data,
    CriteoData,
    CsvData,
    PartitionSpec,
    PythonData,
    SklearnData,
    WideDeepData,
)
from enclavefl.jobs.refs import JobCode, resolve_ref

log = logging.getLogger("enclavefl.jobs")

__all__ = ["PartyData", "load_party_data", "preload_party_data"]


@dataclass(frozen=True)
class PartyData:
    """One party's rows: model inputs (one or more arrays), labels (None on a follower), ids.

    `source` and `label_column` name where the labels came from, for error messages.
    """

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None
    ids: np.ndarray
    source: str = "data"
    label_column: str = "label"

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, rows: np.ndarray) -> PartyData:
        return PartyData(
            tuple(x[rows] for x in self.inputs),
            None if self.labels is None else self.labels[rows],
            self.ids[rows],
            self.source,
            self.label_column,
        )

    @property
    def num_features(self) -> int:
        return int(self.inputs[0].shape[1])


def _partitioned(data: PartyData, spec: PartitionSpec | None, seed: int) -> PartyData:
    if spec is None:
        return data
    labels = data.labels if spec.method == "dirichlet" else None
    parts = partition(len(data), spec.num_parts, spec.method, labels=labels,
                      alpha=spec.alpha or 0.5, seed=seed)
    return data.take(np.sort(parts[spec.index]))


def _labels(y: np.ndarray | None) -> np.ndarray | None:
    if y is None:
        return None
    return y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)


# Data a party loaded before it attested (preload_party_data), handed to the role once.
_preloaded: dict[tuple[object, int], PartyData] = {}


def preload_party_data(spec: object, *, seed: int, code: JobCode | None = None) -> None:
    """Load `spec` now, so that a missing label column or an unreadable file fails before the
    party attests or connects; the next `load_party_data` of the same spec returns it."""
    _preloaded[(spec, seed)] = _load(spec, seed, code)


def load_party_data(spec: object, *, seed: int, code: JobCode | None = None) -> PartyData:
    """Load a data spec of the job file (csv, sklearn, cifar10, criteo, wide-deep, python).

    `code` (the job's `JobCode`) says where a python factory may be imported from.
    """
    preloaded = _preloaded.pop((spec, seed), None)
    return preloaded if preloaded is not None else _load(spec, seed, code)


def _python_data(spec: PythonData, code: JobCode | None) -> PartyData:
    """Rows from the user's factory: (inputs..., labels) arrays, or a Dataset of such items."""
    made = resolve_ref(spec.factory, what="data.factory", code=code)(**spec.args)
    listed = isinstance(made, (tuple, list))
    if (listed and made and isinstance(made[0], (tuple, list))) or (
        not listed and not hasattr(made, "shape") and hasattr(made, "__getitem__") and hasattr(made, "__len__")
    ):  # a dataset (or list) of (inputs..., labels) items
        items = [made[i] for i in range(len(made))]
        if not items or not isinstance(items[0], (tuple, list)) or len(items[0]) < 2:
            raise UsageError(f"data.factory {spec.factory}: a dataset's items must be (inputs..., labels) tuples")
        made = tuple(np.stack([np.asarray(item[k]) for item in items]) for k in range(len(items[0])))
    if not isinstance(made, (tuple, list)) or len(made) < 2:
        raise UsageError(
            f"data.factory {spec.factory} returned {type(made).__name__}: expected (inputs..., labels) arrays "
            "or a dataset of (inputs..., labels) items"
        )
    try:
        arrays = [np.asarray(a.numpy() if hasattr(a, "numpy") else a) for a in made]
    except ValueError as exc:
        raise UsageError(f"data.factory {spec.factory}: not arrays: {exc}") from None
    rows = {a.shape[0] if a.ndim else -1 for a in arrays}
    if len(rows) != 1 or -1 in rows or 0 in rows:
        raise UsageError(
            f"data.factory {spec.factory}: arrays must have the same number of rows >= 1, got {sorted(rows)}"
        )
    inputs = tuple(a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a for a in arrays[:-1])
    count = rows.pop()
    ids = np.array([str(i) for i in range(count)])
    return PartyData(inputs, _labels(arrays[-1]), ids, f"data.factory {spec.factory}", "labels (its last array)")


def _select(X: np.ndarray, names: tuple[str, ...], wanted: tuple[str, ...] | None, source: object) -> np.ndarray:
    if wanted is None:
        return X
    missing = [f for f in wanted if f not in names]
    if missing:
        raise UsageError(f"{source}: feature columns not found: {missing} (it has {list(names)})")
    return X[:, [names.index(f) for f in wanted]]


def _load(spec: object, seed: int, code: JobCode | None) -> PartyData:
    if isinstance(spec, CsvData):
        table = load_fate_csv(
            spec.path, id_column=spec.id_column, label_column=spec.label or "", require_label=spec.label is not None
        )
        X, y, ids = table.X, table.y, table.ids
        if spec.limit is not None:
            X, y, ids = X[: spec.limit], None if y is None else y[: spec.limit], ids[: spec.limit]
        X = _select(X, table.feature_names, spec.features, spec.path)
        data = PartyData((X.astype(np.float32),), _labels(y), ids, str(spec.path), spec.label or "")
    elif isinstance(spec, SklearnData):
        table = load_sklearn(spec.name)
        X = _select(table.X, table.feature_names, spec.features, f"sklearn {spec.name}")
        data = PartyData((X.astype(np.float32),), _labels(table.y), table.ids, f"sklearn {spec.name}", "target")
    elif isinstance(spec, Cifar10Data):
        root = Path(spec.root)
        if spec.download:
            with download_bar("CIFAR-10") as on_progress:
                download_cifar10(root, on_progress=on_progress)
        images, labels = load_cifar10(root, train=spec.split == "train")
        ids = np.array([f"{spec.split}-{i}" for i in range(len(labels))])
        data = PartyData((normalize(images).numpy(),), labels.astype(np.int64), ids, str(root), "labels")
    elif isinstance(spec, CriteoData):
        arrays = load_criteo(spec.path, vocab_sizes=spec.vocab_sizes, limit=spec.limit)
        ids = np.array([str(i) for i in range(len(arrays.label))])
        data = PartyData((arrays.dense, arrays.sparse), arrays.label.astype(np.float32), ids, str(spec.path), "label")
    elif isinstance(spec, WideDeepData):
        path = Path(spec.path)
        if not path.exists():
            if spec.generate is None:
                raise UsageError(f"{path} does not exist (add `generate:` to make the synthetic data)")
            log.info("generating wide&deep data in %s", path.parent)
            make_wide_deep_data(
                path.parent,
                spec.generate.rows,
                fields_per_party=spec.generate.fields_per_party,
                vocab_size=spec.generate.vocab_size,
                seed=seed,
            )
        party = load_wide_deep_party(path)
        data = PartyData((party.x,), _labels(party.y), party.ids, str(path), "y")
    elif isinstance(spec, PythonData):
        data = _python_data(spec, code)
    else:
        raise UsageError(f"unsupported data spec {type(spec).__name__}")
    partition_spec = getattr(spec, "partition", None)
    return _partitioned(data, partition_spec, seed)
