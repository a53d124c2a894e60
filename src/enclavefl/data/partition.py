"""Split rows among horizontal parties, or feature columns among vertical parties.

Row partitioners return one int64 index array per party; the arrays are disjoint and
together cover every row (CCZoo's DLRM sample gives three of its four workers the same
rows; these never overlap).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from enclavefl.data.tabular import Table
from enclavefl.errors import UsageError

Scheme = Literal["file", "iid", "dirichlet"]


def partition(
    num_rows: int,
    num_parties: int,
    scheme: Scheme = "iid",
    *,
    labels: np.ndarray | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Dispatch to a partitioner by name ("file", "iid" or "dirichlet", which needs labels)."""
    if scheme == "file":
        if num_parties != 1:
            raise UsageError(
                f"partition 'file' keeps each party's own file whole: one party per file, got {num_parties}"
            )
        return [np.arange(num_rows, dtype=np.int64)]
    if scheme == "iid":
        return split_iid(num_rows, num_parties, seed=seed)
    if scheme == "dirichlet":
        if labels is None or len(labels) != num_rows:
            raise UsageError(f"partition 'dirichlet' needs {num_rows} labels")
        return split_dirichlet(labels, num_parties, alpha=alpha, seed=seed)
    raise UsageError(f"unknown partition scheme {scheme!r}: use 'file', 'iid' or 'dirichlet'")


def split_iid(num_rows: int, num_parties: int, *, seed: int = 0) -> list[np.ndarray]:
    """A seeded random permutation cut into `num_parties` parts whose sizes differ by at most one."""
    _check_parties(num_rows, num_parties)
    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, num_parties)]


def split_dirichlet(
    labels: np.ndarray, num_parties: int, *, alpha: float = 0.5, seed: int = 0, min_rows: int = 1
) -> list[np.ndarray]:
    """Non-IID label skew: each class is shared among parties in Dirichlet(alpha) proportions.

    Small alpha gives each party few classes; large alpha tends to IID. Every party gets
    at least `min_rows` rows: parties left short take random rows from the largest party.
    """
    labels = np.asarray(labels)
    _check_parties(len(labels), num_parties, min_rows)
    if not alpha > 0:
        raise UsageError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_parties)]
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_parties, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
        for party, chunk in enumerate(np.split(rows, cuts)):
            parts[party].append(chunk)
    out = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
    for party in range(num_parties):
        while len(out[party]) < min_rows:
            donor = int(np.argmax([len(p) for p in out]))
            pick = rng.integers(len(out[donor]))
            out[party] = np.append(out[party], out[donor][pick])
            out[donor] = np.delete(out[donor], pick)
    return [np.sort(p).astype(np.int64) for p in out]


def _check_parties(num_rows: int, num_parties: int, min_rows: int = 1) -> None:
    if num_parties < 1:
        raise UsageError(f"num_parties must be >= 1, got {num_parties}")
    if num_rows < num_parties * min_rows:
        raise UsageError(f"cannot give {num_parties} parties {min_rows} row(s) each from {num_rows} rows")


def split_columns(
    table: Table, parties: int | Sequence[Sequence[str]], *, label_party: int = 0
) -> list[Table]:
    """Vertical split for demos: each party gets some feature columns and every id.

    `parties` is a party count (contiguous, near-equal column groups) or the feature
    names of each party. Only `label_party` (the leader) keeps the labels.
    """
    if isinstance(parties, int):
        if not 1 <= parties <= table.num_features:
            raise UsageError(f"cannot split {table.num_features} columns among {parties} parties")
        groups = [list(g) for g in np.array_split(np.arange(table.num_features), parties)]
    else:
        position = {name: i for i, name in enumerate(table.feature_names)}
        unknown = [n for group in parties for n in group if n not in position]
        if unknown:
            raise UsageError(
                f"unknown feature columns {unknown[:5]}; the table has {list(table.feature_names)[:8]}..."
            )
        groups = [[position[n] for n in group] for group in parties]
        flat = [i for g in groups for i in g]
        if len(flat) != len(set(flat)) or any(not g for g in groups):
            raise UsageError("each column may go to one party only, and each party needs a column")
    if not 0 <= label_party < len(groups):
        raise UsageError(f"label_party {label_party} is not one of the {len(groups)} parties")
    return [
        Table(
            table.ids,
            table.y if party == label_party else None,
            np.ascontiguousarray(table.X[:, cols]),
            tuple(table.feature_names[i] for i in cols),
        )
        for party, cols in enumerate(groups)
    ]
