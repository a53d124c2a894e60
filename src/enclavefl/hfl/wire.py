"""The hfl protocol between parameter server and workers: method names and message layout.

A model travels as a few flat tensors, not one tensor per parameter, so that a message
costs a handful of frames whatever the model and the server can bound how many
contributions it holds at once (`PAYLOAD` is the one large tensor a contribution has):

* state (server -> worker): `dense` = trainable non-table parameters, then floating-point
  buffers, then frozen parameters; `ints` = integer buffers (as int64); embedding tables
  as `table/<name>` (whole, on join) or `rows/<name>/index` + `rows/<name>/values` (the
  rows a worker asked for).
* contribution (worker -> server): `index/<name>` (int64 rows of each table), `ints`
  (integer buffer deltas) and, last, `payload` = gradients or deltas of the trainable
  non-table parameters, then floating-point buffer deltas, then each table's row values.

Both ends derive the `Layout` from their own model; the server sends its description at
join and the worker refuses to train a model that differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from enclavefl.errors import UsageError
from enclavefl.hfl.sparse import SparseRows
from enclavefl.hfl.state import buffer_names, embedding_names
from enclavefl.hfl.strategies import GradContribution, UpdateContribution
from enclavefl.validate import is_int

__all__ = [
    "DENSE",
    "EVAL",
    "INTS",
    "JOIN",
    "PAYLOAD",
    "PROTOCOL",
    "PUSH",
    "SLOT",
    "WAIT",
    "Entry",
    "Layout",
    "Unpacked",
    "message_bytes",
    "meta_int",
    "parse_want",
    "rows_tensors",
    "want_tensors",
]

PROTOCOL = 2
JOIN = "hfl.join"
SLOT = "hfl.slot"
PUSH = "hfl.push"
WAIT = "hfl.wait"
EVAL = "hfl.eval"
LEAVE = "hfl.leave"
PAYLOAD = "payload"
DENSE = "dense"
INTS = "ints"
_FINITE_SLICE = 1 << 20

Contribution = GradContribution | UpdateContribution
C = TypeVar("C", GradContribution, UpdateContribution)


@dataclass(frozen=True)
class Entry:
    """One tensor inside a flat vector: elements [offset, offset + numel)."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


def _entries(named: Sequence[tuple[str, tuple[int, ...]]], start: int = 0) -> list[Entry]:
    out, offset = [], start
    for name, shape in named:
        entry = Entry(name, shape, offset)
        out.append(entry)
        offset = entry.end
    return out


class Layout:
    """Where each tensor of a model sits in the flat state and contribution vectors."""

    def __init__(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        all_buffers = dict(model.named_buffers())
        tables = embedding_names(model)
        trainable = [(n, tuple(p.shape)) for n, p in params.items() if p.requires_grad and n not in tables]
        frozen = [(n, tuple(p.shape)) for n, p in params.items() if not p.requires_grad]
        buffers = [(n, all_buffers[n]) for n in buffer_names(model)]
        float_buffers = [(n, tuple(b.shape)) for n, b in buffers if b.is_floating_point()]
        int_buffers = {n: b for n, b in buffers if not b.is_floating_point()}
        floats = [*params.values(), *(b for _, b in buffers if b.is_floating_point())]
        dtypes = {t.dtype for t in floats}
        if len(dtypes) > 1:
            raise UsageError(
                f"hfl needs one floating-point dtype across the model, got {sorted(str(d) for d in dtypes)}"
            )
        for name in sorted(tables):
            if params[name].dim() != 2:
                raise UsageError(f"embedding table {name!r} must be 2-D, got {list(params[name].shape)}")
        self._fill(
            dtype=dtypes.pop() if dtypes else torch.float32,
            trainable=trainable,
            float_buffers=float_buffers,
            frozen=frozen,
            ints=[(n, tuple(b.shape)) for n, b in int_buffers.items()],
            int_dtypes={n: b.dtype for n, b in int_buffers.items()},
            tables={name: (int(params[name].shape[0]), int(params[name].shape[1])) for name in sorted(tables)},
        )

    @classmethod
    def from_description(cls, described: Any) -> Layout:
        """The layout the server described at join (a worker needs no model of its own)."""
        if not isinstance(described, dict):
            raise UsageError(f"the server sent no model layout (got {type(described).__name__})")
        try:
            dtype = getattr(torch, str(described["dtype"]))
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise TypeError(described["dtype"])
            float_names = set(described["float_buffers"])
            updates = [(str(n), tuple(int(d) for d in shape)) for n, shape in described["updates"]]
            int_dtypes = {str(n): getattr(torch, str(d)) for n, d in described["int_dtypes"].items()}
            layout = cls.__new__(cls)
            layout._fill(
                dtype=dtype,
                trainable=[(n, s) for n, s in updates if n not in float_names],
                float_buffers=[(n, s) for n, s in updates if n in float_names],
                frozen=[(str(n), tuple(int(d) for d in shape)) for n, shape in described["frozen"]],
                ints=[(str(n), tuple(int(d) for d in shape)) for n, shape in described["ints"]],
                int_dtypes=int_dtypes,
                tables={str(n): (int(r), int(c)) for n, (r, c) in described["tables"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"the server sent a malformed model layout ({type(exc).__name__}: {exc})") from exc
        if layout.describe() != described:
            raise UsageError("the server sent a malformed model layout (it does not describe itself the same way)")
        return layout

    def _fill(
        self,
        *,
        dtype: torch.dtype,
        trainable: list[tuple[str, tuple[int, ...]]],
        float_buffers: list[tuple[str, tuple[int, ...]]],
        frozen: list[tuple[str, tuple[int, ...]]],
        ints: list[tuple[str, tuple[int, ...]]],
        int_dtypes: dict[str, torch.dtype],
        tables: dict[str, tuple[int, int]],
    ) -> None:
        self.dtype = dtype
        self.updates = _entries([*trainable, *float_buffers])
        self.num_updates = self.updates[-1].end if self.updates else 0
        self.frozen = _entries(frozen, self.num_updates)
        self.num_dense = self.frozen[-1].end if self.frozen else self.num_updates
        self.ints = _entries(ints)
        self.num_ints = self.ints[-1].end if self.ints else 0
        self.float_buffers = [n for n, _ in float_buffers]
        self.int_dtypes = dict(int_dtypes)
        self.tables = dict(tables)

    def describe(self) -> dict[str, Any]:
        """JSON description, compared by the worker against its own model."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "updates": [[e.name, list(e.shape)] for e in self.updates],
            "frozen": [[e.name, list(e.shape)] for e in self.frozen],
            "ints": [[e.name, list(e.shape)] for e in self.ints],
            "tables": {name: list(shape) for name, shape in self.tables.items()},
            "float_buffers": list(self.float_buffers),
            "int_dtypes": {name: str(d).removeprefix("torch.") for name, d in self.int_dtypes.items()},
        }

    def check_matches(self, described: Any) -> None:
        """Raise UsageError naming the first difference between this model and the server's."""
        mine = self.describe()
        if not isinstance(described, dict):
            raise UsageError(f"the server sent no model layout (got {type(described).__name__})")
        for key, value in mine.items():
            theirs = described.get(key)
            if theirs == value:
                continue
            if isinstance(value, list) and isinstance(theirs, list):
                for i, (a, b) in enumerate(zip(value, theirs, strict=False)):
                    if a != b:
                        raise UsageError(f"model differs from the server's: {key}[{i}] is {a}, the server has {b}")
                raise UsageError(f"model differs from the server's: {len(value)} {key}, the server has {len(theirs)}")
            raise UsageError(f"model differs from the server's: {key} is {value}, the server has {theirs}")

    # -- state ----------------------------------------------------------------------

    def pack_state(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh flat copies (dense, ints) of the model's non-table state."""
        live = _live(model)
        dense = torch.empty(self.num_dense, dtype=self.dtype)
        for entry in (*self.updates, *self.frozen):
            dense[entry.offset : entry.end].copy_(live[entry.name].detach().reshape(-1))
        ints = torch.empty(self.num_ints, dtype=torch.int64)
        for entry in self.ints:
            ints[entry.offset : entry.end].copy_(live[entry.name].reshape(-1))
        return dense, ints

    def load_state(self, model: nn.Module, dense: torch.Tensor, ints: torch.Tensor) -> None:
        """Copy flat state into the model in place (after `check_state_tensors`)."""
        live = _live(model)
        with torch.no_grad():
            for entry in (*self.updates, *self.frozen):
                live[entry.name].copy_(dense[entry.offset : entry.end].view(entry.shape))
            for entry in self.ints:
                live[entry.name].copy_(ints[entry.offset : entry.end].view(entry.shape))

    def check_state_tensors(self, dense: Any, ints: Any) -> None:
        _check_vector("state dense", dense, self.dtype, self.num_dense)
        _check_vector("state ints", ints, torch.int64, self.num_ints)

    def no_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, values) of zero rows of table `name`."""
        return torch.empty(0, dtype=torch.int64), torch.empty(0, self.tables[name][1], dtype=self.dtype)

    # -- contributions --------------------------------------------------------------

    def pack_contribution(self, contribution: Contribution) -> dict[str, torch.Tensor]:
        """The tensors of a contribution message (`payload` last)."""
        updates = contribution.updates
        parts: list[torch.Tensor] = []
        out: dict[str, torch.Tensor] = {}
        for entry in self.updates:
            value: torch.Tensor | SparseRows | None
            if entry.name in self.float_buffers:
                value = contribution.buffer_deltas.get(entry.name)
            else:
                value = updates.get(entry.name)
            if isinstance(value, SparseRows):
                value = value.to_dense()
            # A parameter the batch did not reach has no gradient: it contributes zeros.
            parts.append(torch.zeros(entry.numel, dtype=self.dtype) if value is None else value.reshape(-1))
        for name in self.tables:
            rows = updates.get(name)
            if rows is None:
                rows = SparseRows(*self.no_rows(name), self.tables[name][0])
            elif not isinstance(rows, SparseRows):
                rows = SparseRows.from_dense(rows)
            out[f"index/{name}"] = rows.indices
            parts.append(rows.values.reshape(-1))
        ints = torch.zeros(self.num_ints, dtype=torch.int64)
        for entry in self.ints:
            delta = contribution.buffer_deltas.get(entry.name)
            if delta is not None:
                ints[entry.offset : entry.end] = delta.reshape(-1)
        out[INTS] = ints
        out[PAYLOAD] = torch.cat([p.detach().to(self.dtype) for p in parts] or [torch.empty(0, dtype=self.dtype)])
        return out

    def unpack_contribution(self, tensors: Mapping[str, Any], payload: Any) -> Unpacked:
        """Validated views of a received contribution (hostile input: every size is checked)."""
        expected = {INTS, *(f"index/{n}" for n in self.tables)}
        got = set(tensors) - {PAYLOAD}
        if got != expected:
            raise UsageError(
                f"contribution tensors: missing {sorted(expected - got)}, unexpected {sorted(got - expected)}"
            )
        rows: dict[str, torch.Tensor] = {}
        size = self.num_updates
        for name, (num_rows, dim) in self.tables.items():
            index = _as_torch(tensors[f"index/{name}"])
            if index.dtype != torch.int64 or index.dim() != 1:
                raise UsageError(
                    f"contribution index/{name}: expected int64 [k], got {index.dtype} {list(index.shape)}"
                )
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_rows):
                raise UsageError(f"contribution index/{name}: rows outside [0, {num_rows})")
            rows[name] = index
            size += index.numel() * dim
        ints = _as_torch(tensors[INTS])
        _check_vector("contribution ints", ints, torch.int64, self.num_ints)
        payload = _as_torch(payload)
        _check_vector("contribution payload", payload, self.dtype, size)
        # In slices: a mask of the whole payload would cost a quarter of its size.
        for start in range(0, payload.numel(), _FINITE_SLICE):
            if not bool(torch.isfinite(payload[start : start + _FINITE_SLICE]).all()):
                raise UsageError("contribution payload holds NaN or infinite values")
        values: dict[str, torch.Tensor] = {}
        offset = self.num_updates
        for name, index in rows.items():
            dim = self.tables[name][1]
            values[name] = payload[offset : offset + index.numel() * dim].view(index.numel(), dim)
            offset += index.numel() * dim
        return Unpacked(payload[: self.num_updates], {n: (rows[n], values[n]) for n in rows}, ints)

    def contribution(self, unpacked: Unpacked, *, kind: type[C], worker: str, weight: int, version: int) -> C:
        """A strategy contribution whose tensors are views of `unpacked` (no copy)."""
        updates: dict[str, torch.Tensor | SparseRows] = {}
        buffer_deltas: dict[str, torch.Tensor] = {}
        for entry in self.updates:
            view = unpacked.dense[entry.offset : entry.end].view(entry.shape)
            (buffer_deltas if entry.name in self.float_buffers else updates)[entry.name] = view
        for name, (index, values) in unpacked.rows.items():
            updates[name] = SparseRows(index, values, self.tables[name][0])
        for entry in self.ints:
            buffer_deltas[entry.name] = unpacked.ints[entry.offset : entry.end].view(entry.shape).to(
                self.int_dtypes[entry.name]
            )
        return kind(worker, weight, updates, version, buffer_deltas)


@dataclass(frozen=True)
class Unpacked:
    """A contribution as flat views: `dense` updates, table `rows` (index, values), `ints`."""

    dense: torch.Tensor
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ints: torch.Tensor


def _live(model: nn.Module) -> dict[str, torch.Tensor]:
    live: dict[str, torch.Tensor] = dict(model.named_parameters())
    live.update(model.named_buffers())
    return live


def _as_torch(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(value)


def _check_vector(what: str, value: Any, dtype: torch.dtype, size: int) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != (size,):
        got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise UsageError(f"{what}: expected {dtype} [{size}], got {got}")


def meta_int(meta: Mapping[str, Any], key: str, *, minimum: int = 0) -> int:
    """An integer field of a message's meta, checked (UsageError names the field)."""
    value = meta.get(key)
    if not is_int(value) or value < minimum:
        raise UsageError(f"message field {key!r} must be an int >= {minimum}, got {value!r}")
    return value


def rows_tensors(prefix: str, rows: Mapping[str, SparseRows]) -> dict[str, torch.Tensor]:
    """`<prefix>/<table>/index` and `/values` tensors of table rows."""
    out: dict[str, torch.Tensor] = {}
    for name, r in rows.items():
        out[f"{prefix}/{name}/index"] = r.indices
        out[f"{prefix}/{name}/values"] = r.values
    return out


def want_tensors(want: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A request for table rows: `want/<table>` = the unique row indices."""
    return {f"want/{name}": torch.unique(index.reshape(-1).to(torch.int64)) for name, index in want.items()}


def parse_want(layout: Layout, tensors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Requested table rows of a request (validated)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith("want/"):
            continue
        name = key.removeprefix("want/")
        if name not in layout.tables:
            raise UsageError(f"rows requested of {name!r}, which is not an embedding table of the model")
        index = _as_torch(value)
        if index.dtype != torch.int64 or index.dim() != 1:
            raise UsageError(f"{key}: expected int64 [k], got {index.dtype} {list(index.shape)}")
        num_rows = layout.tables[name][0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_rows):
            raise UsageError(f"{key}: rows outside [0, {num_rows})")
        out[name] = index
    return out


def message_bytes(tensors: Mapping[str, Any]) -> int:
    """Tensor bytes of a message (what travels, framing aside)."""
    return sum(int(t.nbytes) for t in tensors.values())
