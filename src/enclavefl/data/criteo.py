"""Criteo display-advertising data (the Kaggle challenge format), read in chunks.

Two layouts are accepted: Kaggle's train.txt (tab-separated, no header) and the
comma-separated layout with a `label,I1..I13,C1..C26` header (DeepCTR's sample). Empty
fields are missing values.

Dense features: missing -> 0, negatives clipped to 0, then log(1 + x), as DLRM does.
Categorical features: hashed with BLAKE2b (stable across processes and machines, unlike
Python's salted hash()) into a fixed vocabulary per field; index 0 is reserved for
"missing". A fixed hashed vocabulary is what lets federated parties agree on embedding
table sizes without pooling their data (CCZoo's sample counts the distinct values of the
whole file instead).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from enclavefl.errors import FormatError, UsageError

NUM_DENSE = 13
NUM_SPARSE = 26
DENSE_COLUMNS = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
SPARSE_COLUMNS = tuple(f"C{i}" for i in range(1, NUM_SPARSE + 1))
HEADER = ("label", *DENSE_COLUMNS, *SPARSE_COLUMNS)
DEFAULT_VOCAB_SIZE = 10_000
DEFAULT_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class CriteoArrays:
    """dense float32 [N, 13], sparse int64 [N, 26] (hashed, 0 = missing), label float32 [N]."""

    dense: np.ndarray
    sparse: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dense, sparse, label) as torch tensors sharing the numpy memory."""
        return torch.from_numpy(self.dense), torch.from_numpy(self.sparse), torch.from_numpy(self.label)


@lru_cache(maxsize=1 << 20)
def hash_category(value: str, vocab_size: int) -> int:
    """Stable index in [1, vocab_size) for a non-empty categorical value."""
    if vocab_size < 2:
        raise UsageError(f"vocab_size must be >= 2 (0 is 'missing'), got {vocab_size}")
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (vocab_size - 1) + 1


def _vocab_list(vocab_sizes: int | Sequence[int]) -> list[int]:
    sizes = [int(vocab_sizes)] * NUM_SPARSE if isinstance(vocab_sizes, int) else [int(v) for v in vocab_sizes]
    if len(sizes) != NUM_SPARSE or min(sizes) < 2:
        raise UsageError(
            f"vocab_sizes must be one int or {NUM_SPARSE} ints >= 2 (0 is 'missing'), got {sizes[:4]}..."
        )
    return sizes


def iter_criteo(
    path: str | Path,
    *,
    vocab_sizes: int | Sequence[int] = DEFAULT_VOCAB_SIZE,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    limit: int | None = None,
) -> Iterator[CriteoArrays]:
    """Stream a Criteo file as chunks of at most `chunk_rows` rows (the first `limit` rows)."""
    sizes = _vocab_list(vocab_sizes)
    if chunk_rows < 1:
        raise UsageError(f"chunk_rows must be >= 1, got {chunk_rows}")
    path = Path(path)
    try:
        handle = path.open("r", encoding="utf-8", newline="")
    except OSError as exc:
        raise UsageError(f"cannot read Criteo file {path}: {exc.strerror}") from None
    with handle:
        try:
            yield from _parse(handle, path, sizes, chunk_rows, limit)
        except UnicodeDecodeError as exc:
            raise FormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_criteo(
    path: str | Path,
    *,
    vocab_sizes: int | Sequence[int] = DEFAULT_VOCAB_SIZE,
    limit: int | None = None,
) -> CriteoArrays:
    """Read a whole Criteo file (or its first `limit` rows) into memory."""
    chunks = list(iter_criteo(path, vocab_sizes=vocab_sizes, limit=limit))
    if not chunks:
        return CriteoArrays(
            np.zeros((0, NUM_DENSE), np.float32), np.zeros((0, NUM_SPARSE), np.int64), np.zeros(0, np.float32)
        )
    return CriteoArrays(
        np.concatenate([c.dense for c in chunks]),
        np.concatenate([c.sparse for c in chunks]),
        np.concatenate([c.label for c in chunks]),
    )


def _parse(
    handle: TextIO, path: Path, sizes: list[int], chunk_rows: int, limit: int | None
) -> Iterator[CriteoArrays]:
    first = handle.readline()
    if not first:
        raise FormatError(f"{path}: empty file")
    delimiter = "\t" if "\t" in first else ","
    fields = first.rstrip("\r\n").split(delimiter)
    pending: list[tuple[int, str]] = []
    if fields[0].strip() == "label":
        if tuple(f.strip() for f in fields) != HEADER:
            raise FormatError(
                f"{path} line 1: header must be {','.join(HEADER[:3])},...,C26, got {first[:80]!r}"
            )
    else:
        pending.append((1, first))
    rows = 0
    chunk = _Chunk(chunk_rows)
    for line_no, line in itertools.chain(pending, enumerate(handle, start=2)):
        if limit is not None and rows >= limit:
            break
        if not line.strip():
            continue
        chunk.add(_parse_line(line, delimiter, sizes, path, line_no))
        rows += 1
        if chunk.full:
            yield chunk.take()
    if chunk.size:
        yield chunk.take()


def _parse_line(
    line: str, delimiter: str, sizes: list[int], path: Path, line_no: int
) -> tuple[float, list[float], list[int]]:
    values = line.rstrip("\r\n").split(delimiter)
    if len(values) != len(HEADER):
        raise FormatError(f"{path} line {line_no}: expected {len(HEADER)} fields, got {len(values)}")
    label_text = values[0]
    if label_text not in ("0", "1", "0.0", "1.0"):
        raise FormatError(f"{path} line {line_no}: label must be 0 or 1, got {label_text!r}")
    dense = []
    for column, text in zip(DENSE_COLUMNS, values[1 : 1 + NUM_DENSE], strict=True):
        if not text:
            dense.append(0.0)
            continue
        try:
            x = float(text)
        except ValueError:
            raise FormatError(f"{path} line {line_no}, column {column}: {text!r} is not a number") from None
        if not math.isfinite(x):
            raise FormatError(f"{path} line {line_no}, column {column}: {text!r} is not finite")
        dense.append(math.log1p(x) if x > 0 else 0.0)
    sparse = [
        hash_category(text, size) if text else 0
        for text, size in zip(values[1 + NUM_DENSE :], sizes, strict=True)
    ]
    return float(label_text), dense, sparse


class _Chunk:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._labels: list[float] = []
        self._dense: list[list[float]] = []
        self._sparse: list[list[int]] = []

    @property
    def size(self) -> int:
        return len(self._labels)

    @property
    def full(self) -> bool:
        return self.size >= self.capacity

    def add(self, row: tuple[float, list[float], list[int]]) -> None:
        label, dense, sparse = row
        self._labels.append(label)
        self._dense.append(dense)
        self._sparse.append(sparse)

    def take(self) -> CriteoArrays:
        out = CriteoArrays(
            np.asarray(self._dense, dtype=np.float32).reshape(-1, NUM_DENSE),
            np.asarray(self._sparse, dtype=np.int64).reshape(-1, NUM_SPARSE),
            np.asarray(self._labels, dtype=np.float32),
        )
        self._labels, self._dense, self._sparse = [], [], []
        return out
