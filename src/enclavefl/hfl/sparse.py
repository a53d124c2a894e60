"""Embedding tables as sparse rows: only the rows a batch touched travel, both ways.

Worker -> server: a gradient (or a round's delta) of an embedding table is `SparseRows`,
built from the torch sparse COO gradient of nn.Embedding(sparse=True) or from a dense
tensor by its nonzero rows. The server averages several workers' rows over the union of
their indices, a worker that did not touch a row counting as zero for it, which is
exactly dense averaging.

Applying to the server's table, the server optimizer decides the form (`grad_form`):

* torch.optim.SGD (and its twin `PlainSGD`) and Adagrad with weight_decay=0 take the rows as a torch sparse
  gradient; the result is identical to the dense update. With SGD momentum torch keeps a
  sparse momentum buffer, so every row touched so far keeps moving: use momentum=0 (or
  Adagrad) for tables far larger than a batch touches.
* torch.optim.SparseAdam requires sparse gradients and is *lazy* Adam: only the rows in
  this step's gradient update their moments and values. A dense gradient given to it is
  first reduced to its nonzero rows.
* Every other optimizer, and SGD/Adagrad with weight decay (which decays every row), gets
  the rows densified: exact, but the whole table is written each step.

Server -> worker: `pull_rows` sends the rows a worker's next batch will look up (the
unique indices of that batch) and `write_rows` puts them into the worker's copy, whose
other rows may be stale but are not looked up; a worker that (re)joins gets the full table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from enclavefl.errors import UsageError
from enclavefl.train.optim import PlainOptimizer, PlainSGD
from enclavefl.validate import is_int

__all__ = [
    "GradForm",
    "SparseRows",
    "add_rows",
    "as_grad",
    "grad_form",
    "pull_rows",
    "weighted_average",
    "write_rows",
]

GradForm = Literal["dense", "sparse-ok", "sparse-only"]


@dataclass(frozen=True, eq=False)
class SparseRows:
    """Rows `indices` of a [num_rows, dim] table; `values[i]` belongs to row `indices[i]`.

    Indices may repeat (values of a repeated row add up) until `coalesce()`.
    """

    indices: torch.Tensor
    values: torch.Tensor
    num_rows: int

    def __post_init__(self) -> None:
        if self.indices.dtype != torch.int64 or self.indices.dim() != 1:
            raise UsageError(
                f"SparseRows.indices must be int64 [k], got {self.indices.dtype} {list(self.indices.shape)}"
            )
        if self.values.dim() != 2 or self.values.shape[0] != self.indices.shape[0]:
            raise UsageError(
                f"SparseRows.values must be [k={self.indices.shape[0]}, dim], got {list(self.values.shape)}"
            )
        if not self.values.is_floating_point():
            raise UsageError(f"SparseRows.values must be floating point, got {self.values.dtype}")
        if not is_int(self.num_rows) or self.num_rows < 1:
            raise UsageError(f"SparseRows.num_rows must be an int >= 1, got {self.num_rows!r}")
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= self.num_rows):
            raise UsageError(
                f"SparseRows.indices must lie in [0, {self.num_rows}), got "
                f"[{int(self.indices.min())}, {int(self.indices.max())}]"
            )

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense table these rows belong to."""
        return torch.Size((self.num_rows, self.dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (indices + values)."""
        return self.indices.numel() * 8 + self.values.numel() * self.values.element_size()

    @classmethod
    def from_torch_sparse(cls, grad: torch.Tensor) -> SparseRows:
        """From a sparse COO tensor with one sparse dimension (nn.Embedding(sparse=True) grads)."""
        if not grad.is_sparse or grad.sparse_dim() != 1 or grad.dense_dim() != 1:
            raise UsageError(
                "expected a sparse COO tensor with 1 sparse and 1 dense dimension, got "
                f"layout={grad.layout} shape={list(grad.shape)}"
            )
        grad = grad.coalesce()
        return cls(grad.indices()[0].clone(), grad.values().detach().clone(), int(grad.shape[0]))

    @classmethod
    def from_dense(cls, table: torch.Tensor) -> SparseRows:
        """The rows of a dense [num_rows, dim] tensor that hold any nonzero value."""
        if table.dim() != 2 or table.is_sparse:
            raise UsageError(f"expected a dense [num_rows, dim] tensor, got {list(table.shape)}")
        rows = table.ne(0).any(dim=1).nonzero().squeeze(1)
        return cls(rows, table.detach()[rows].clone(), int(table.shape[0]))

    def coalesce(self) -> SparseRows:
        """Sorted unique indices, the values of repeated indices summed."""
        unique, inverse = torch.unique(self.indices, sorted=True, return_inverse=True)
        values = self.values.new_zeros((unique.numel(), self.dim)).index_add_(0, inverse, self.values)
        return SparseRows(unique, values, self.num_rows)

    def scaled(self, factor: float) -> SparseRows:
        return SparseRows(self.indices, self.values * factor, self.num_rows)

    def to_dense(self) -> torch.Tensor:
        return self.values.new_zeros(self.shape).index_add_(0, self.indices, self.values)

    def to_torch_sparse(self) -> torch.Tensor:
        # __post_init__ already checked the indices, so torch need not check them again.
        return torch.sparse_coo_tensor(
            self.indices.unsqueeze(0), self.values, self.shape, check_invariants=False
        ).coalesce()


def weighted_average(rows: Sequence[SparseRows], weights: Sequence[float]) -> SparseRows:
    """sum_i weights[i] * rows[i] / sum(weights), over the union of the rows' indices."""
    if not rows:
        raise UsageError("cannot average zero SparseRows")
    if len(rows) != len(weights):
        raise UsageError(f"got {len(rows)} SparseRows but {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise UsageError(f"weights must be > 0, got {list(weights)}")
    first = rows[0]
    for r in rows[1:]:
        if r.shape != first.shape or r.dtype != first.dtype:
            raise UsageError(
                f"cannot average SparseRows of {first.dtype} {list(first.shape)} "
                f"with {r.dtype} {list(r.shape)}"
            )
    total = float(sum(weights))
    indices = torch.cat([r.indices for r in rows])
    values = torch.cat([r.values * (w / total) for r, w in zip(rows, weights, strict=False)])
    return SparseRows(indices, values, first.num_rows).coalesce()


def grad_form(optimizer: torch.optim.Optimizer | PlainOptimizer) -> GradForm:
    """Which gradient form `optimizer` accepts for a table (see the module docstring)."""
    if isinstance(optimizer, torch.optim.SparseAdam):
        return "sparse-only"
    if isinstance(optimizer, (torch.optim.SGD, torch.optim.Adagrad, PlainSGD)) and all(
        group["weight_decay"] == 0 for group in optimizer.param_groups
    ):
        return "sparse-ok"
    return "dense"


def as_grad(value: torch.Tensor | SparseRows, form: GradForm) -> torch.Tensor:
    """The `.grad` to set for an averaged gradient, in the form the optimizer accepts."""
    if isinstance(value, SparseRows):
        return value.to_dense() if form == "dense" else value.to_torch_sparse()
    if form == "sparse-only":
        return SparseRows.from_dense(value).to_torch_sparse()
    return value


def pull_rows(table: torch.Tensor, indices: torch.Tensor) -> SparseRows:
    """The current values of the rows `indices` (any shape, repeats allowed) look up."""
    if table.dim() != 2:
        raise UsageError(f"expected a [num_rows, dim] table, got {list(table.shape)}")
    if indices.dtype != torch.int64:
        raise UsageError(f"row indices must be int64, got {indices.dtype}")
    unique = torch.unique(indices.flatten(), sorted=True)
    return SparseRows(unique, table.detach()[unique].clone(), int(table.shape[0]))


def write_rows(table: torch.Tensor, rows: SparseRows) -> None:
    """Overwrite the rows of `table` named by `rows` (a worker's copy after a pull)."""
    if rows.shape != table.shape or rows.dtype != table.dtype:
        raise UsageError(
            f"rows of a {rows.dtype} {list(rows.shape)} table cannot be written into "
            f"a {table.dtype} {list(table.shape)} table"
        )
    if torch.unique(rows.indices).numel() != rows.indices.numel():
        raise UsageError("rows to write must have unique indices (coalesce them first)")
    with torch.no_grad():
        table[rows.indices] = rows.values


def add_rows(table: torch.Tensor, rows: SparseRows, alpha: float = 1.0) -> None:
    """table[rows.indices] += alpha * rows.values (repeated indices add up)."""
    if rows.shape != table.shape or rows.dtype != table.dtype:
        raise UsageError(
            f"rows of a {rows.dtype} {list(rows.shape)} table cannot be added to "
            f"a {table.dtype} {list(table.shape)} table"
        )
    with torch.no_grad():
        table.index_add_(0, rows.indices, rows.values, alpha=alpha)
