"""Tabular data: FATE-style CSV files and scikit-learn's bundled data sets.

FATE layout: a header, then `id,y,x0,x1,...` for files that hold labels (guest and
horizontal files) or `id,x0,x1,...` for files without (vertical host files).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enclavefl.errors import FormatError, UsageError

__all__ = ["SKLEARN_DATASETS", "Table", "load_fate_csv", "load_sklearn"]

SKLEARN_DATASETS = ("breast_cancer", "diabetes", "digits")


@dataclass(frozen=True)
class Table:
    """Rows of one party: ids (str [N]), labels (int64 or float32 [N], or None), features float32 [N, F]."""

    ids: np.ndarray
    y: np.ndarray | None
    X: np.ndarray  # noqa: N815 - the usual name for a feature matrix
    feature_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.X.shape[1])

    def take(self, rows: np.ndarray | Sequence[int]) -> Table:
        """The rows at `rows` (indices), in that order."""
        index = np.asarray(rows, dtype=np.int64)
        return Table(
            self.ids[index], None if self.y is None else self.y[index], self.X[index], self.feature_names
        )


def load_fate_csv(
    path: str | Path, *, id_column: str = "id", label_column: str = "y", require_label: bool = False
) -> Table:
    """Read a FATE-style CSV; labels are int64 when every label is integral, else float32.

    Without a `label_column` in the header the table has no labels, unless `require_label`
    (a configured label column): then its absence is an error, never a silent fall-back
    that would turn the real label column into a feature. A file that is not UTF-8 CSV text
    (a binary file, NUL bytes, a field over the csv module's limit) is a FormatError.
    """
    path = Path(path)
    header, records = _read_rows(path, id_column=id_column, label_column=label_column, require_label=require_label)
    id_at = header.index(id_column)
    label_at = header.index(label_column) if label_column in header else None
    feature_at = [i for i in range(len(header)) if i not in (id_at, label_at)]
    if not records:
        raise FormatError(f"{path}: no data rows after the header")
    cells = np.asarray([record for _, record in records], dtype=str)
    id_array = np.char.strip(cells[:, id_at])
    unique, counts = np.unique(id_array, return_counts=True)
    if counts.max() > 1:
        raise FormatError(f"{path}: duplicate ids, e.g. {unique[counts > 1][:3].tolist()}")
    numeric_at = feature_at if label_at is None else [label_at, *feature_at]
    numbers = _to_numbers(cells[:, numeric_at], [header[i] for i in numeric_at], records, path)
    y = None
    if label_at is not None:
        y = numbers[:, 0]
        y = y.astype(np.int64) if np.all(y == np.round(y)) else y.astype(np.float32)
        numbers = numbers[:, 1:]
    return Table(id_array, y, numbers.astype(np.float32), tuple(header[i] for i in feature_at))


def _read_rows(
    path: Path, *, id_column: str, label_column: str, require_label: bool
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (stripped names, checked first) and the non-empty records with their line
    numbers, each as wide as the header; FormatError for a file that is not UTF-8 CSV text."""
    try:
        handle = path.open("r", encoding="utf-8", newline="")
    except OSError as exc:
        raise UsageError(f"cannot read table {path}: {exc.strerror}") from None
    reader = csv.reader(handle)
    try:
        with handle:
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise FormatError(f"{path}: empty file (expected a header such as id,y,x0,...)") from None
            _check_header(path, header, id_column=id_column, label_column=label_column, require_label=require_label)
            records = []
            for line_no, record in enumerate(reader, start=2):
                if not record:
                    continue
                if len(record) != len(header):
                    raise FormatError(f"{path} line {line_no}: expected {len(header)} fields, got {len(record)}")
                records.append((line_no, record))
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not a CSV text file (not UTF-8 at byte {exc.start}: {exc.reason})") from None
    except csv.Error as exc:
        raise FormatError(f"{path} line {reader.line_num}: not a CSV text file ({exc})") from None
    return header, records


def _check_header(path: Path, header: list[str], *, id_column: str, label_column: str, require_label: bool) -> None:
    """An id column, unique names, and the label column when one is required."""
    if id_column not in header:
        raise FormatError(f"{path}: no id column {id_column!r} in header {header[:6]}")
    if len(set(header)) != len(header):
        raise FormatError(f"{path}: duplicate column names in header {header}")
    if require_label and label_column not in header:
        raise FormatError(
            f"{path}: no label column {label_column!r} in header {header[:6]}"
            f"{' ...' if len(header) > 6 else ''}: set the data spec's label to the file's label column"
        )


def _to_numbers(
    cells: np.ndarray, columns: list[str], records: list[tuple[int, list[str]]], path: Path
) -> np.ndarray:
    try:
        numbers = cells.astype(np.float64)
    except ValueError:
        numbers = None
    if numbers is not None and np.isfinite(numbers).all():
        return numbers
    # Slow path, cell by cell, to name the first bad cell.
    out = np.empty(cells.shape, dtype=np.float64)
    for row, (line_no, _) in enumerate(records):
        for col, column in enumerate(columns):
            out[row, col] = _number(str(cells[row, col]), path, line_no, column)
    return out


def _number(text: str, path: Path, line_no: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FormatError(f"{path} line {line_no}, column {column!r}: {text!r} is not a number") from None
    if not np.isfinite(value):
        raise FormatError(f"{path} line {line_no}, column {column!r}: {text!r} is not finite")
    return value


def load_sklearn(name: str, *, standardize: bool = True) -> Table:
    """A scikit-learn bundled data set ("breast_cancer", "digits" or "diabetes"), offline.

    Labels are int64 classes, or float32 for diabetes (a regression target).

    With `standardize` every column has mean 0 and variance 1 over the whole set (a demo
    convenience: a real evaluation fits the scaler on the training rows only).
    """
    from sklearn import datasets
    from sklearn.preprocessing import StandardScaler

    loaders = {
        "breast_cancer": datasets.load_breast_cancer,
        "diabetes": datasets.load_diabetes,
        "digits": datasets.load_digits,
    }
    if name not in loaders:
        raise UsageError(f"unknown scikit-learn data set {name!r}: use one of {list(SKLEARN_DATASETS)}")
    bunch = loaders[name]()
    features = np.asarray(bunch.data, dtype=np.float64)
    if standardize:
        features = StandardScaler().fit_transform(features)
    names = tuple(str(n) for n in bunch.feature_names)
    ids = np.asarray([str(i) for i in range(features.shape[0])], dtype=str)
    target = np.asarray(bunch.target)
    labels = target.astype(np.float32) if name == "diabetes" else target.astype(np.int64)
    return Table(ids, labels, features.astype(np.float32), names)
