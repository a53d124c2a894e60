"""Driving a strategy from the parameter server: configure, collect, aggregate, checkpoint.

The parameter server owns the global model and hands the strategy what the contract in
`enclavefl.hfl.contract` promises; this module is that glue, so the server needs to know
nothing about which strategy it runs:

* a strategy with `aggregate_mean` (FedAvg, FedProx, FedAdam, sync-sgd) gets the
  weighted mean of the round's contributions, added into one float64 running sum on the
  server's device as they arrive (memory: one accumulator, whatever the worker count);
* any other strategy gets every contribution, as numpy, when the round closes (memory:
  one update per worker).

Round contributions carry the workers' new values of the dense entries, so the mean is
exact: a single worker's weights come back bit for bit. Tables travel as row deltas.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from enclavefl.errors import ConfigError, FormatError, UsageError
from enclavefl.hfl import wire
from enclavefl.hfl.contract import Contribution, check_strategy
from enclavefl.hfl.sparse import SparseRows
from enclavefl.hfl.state import load_state, model_state
from enclavefl.hfl.strategies import GradContribution, UpdateContribution
from enclavefl.validate import is_int, is_number

__all__ = ["Accumulator", "StrategyDriver"]


class Accumulator:
    """Weighted sums of one step's or round's contributions, added as they arrive (float64)."""

    def __init__(self, layout: wire.Layout, device: torch.device) -> None:
        self._layout = layout
        self._device = device
        self.dense: torch.Tensor | None = None
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ints_sum = torch.zeros(layout.num_ints, dtype=torch.int64, device=device)
        self.ints_max: torch.Tensor | None = None
        self.weight = 0

    def add(self, unpacked: wire.Unpacked, weight: int) -> None:
        device = self._device
        if self.dense is None:
            self.dense = torch.zeros(self._layout.num_updates, dtype=torch.float64, device=device)
        self.dense.add_(unpacked.dense.to(device, torch.float64), alpha=weight)
        for name, (index, values) in unpacked.rows.items():
            old_index, old_values = self.rows.get(name) or _no_rows(self._layout, name, device)
            merged = SparseRows(
                torch.cat([old_index, index.to(device)]),
                torch.cat([old_values, values.to(device) * weight]),
                self._layout.tables[name][0],
            ).coalesce()
            self.rows[name] = (merged.indices, merged.values)
        ints = unpacked.ints.to(device)
        self.ints_sum += ints
        self.ints_max = ints.clone() if self.ints_max is None else torch.maximum(self.ints_max, ints)
        self.weight += weight

    def mean(self, kind: str, version: int, start: torch.Tensor) -> GradContribution | UpdateContribution:
        """The weighted mean as one contribution of weight = total weight.

        Rounds: the dense part holds values, so the delta is mean - start (float64);
        integer buffers add up. Steps: gradients and buffer deltas; integer buffers take
        the largest increment (one step is one union batch).
        """
        assert self.dense is not None and self.ints_max is not None
        dense = self.dense.div_(self.weight)
        if kind == "update":
            dense.sub_(start[: self._layout.num_updates].to(self._device, torch.float64))
        rows = {name: (index, values.div_(self.weight)) for name, (index, values) in self.rows.items()}
        for name in self._layout.tables:
            rows.setdefault(name, _no_rows(self._layout, name, self._device))
        ints = self.ints_sum if kind == "update" else self.ints_max
        unpacked = wire.Unpacked(dense, rows, ints)
        cls = UpdateContribution if kind == "update" else GradContribution
        return self._layout.contribution(unpacked, kind=cls, worker="aggregate", weight=self.weight, version=version)  # type: ignore[return-value, type-var]


def _no_rows(layout: wire.Layout, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    index, values = layout.no_rows(name)
    return index.to(device), values.to(device)


class StateView(Mapping[str, np.ndarray]):
    """The global model as read-only numpy arrays, made on access (one copy per name on a GPU)."""

    def __init__(self, model: nn.Module) -> None:
        live: dict[str, torch.Tensor] = dict(model.named_parameters())
        persistent = set(model.state_dict(keep_vars=True))
        live.update((n, b) for n, b in model.named_buffers() if n in persistent)
        self._live = live

    def __getitem__(self, name: str) -> np.ndarray:
        array = self._live[name].detach().cpu().numpy()
        array.flags.writeable = False
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._live)

    def __len__(self) -> int:
        return len(self._live)


class StrategyDriver:
    """The parameter server's side of the strategy contract (see the module docstring)."""

    def __init__(self, strategy: Any, model: nn.Module, layout: wire.Layout) -> None:
        check_strategy(strategy)
        self.strategy = strategy
        self.model = model
        self.layout = layout
        self.name: str = strategy.name
        self.kind: str = getattr(strategy, "kind", "update")
        self.asynchronous = bool(getattr(strategy, "asynchronous", False))
        self.streaming = callable(getattr(strategy, "aggregate_mean", None))
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        version = getattr(strategy, "version", 0)
        self.version = version if is_int(version) else 0
        self.config: dict[str, Any] = {}
        self._held: list[Contribution] = []
        self._sum = Accumulator(layout, self.device)
        self._state = StateView(model)

    @property
    def unit(self) -> str:
        return "round" if self.kind == "update" else "step"

    @property
    def state(self) -> Mapping[str, np.ndarray]:
        return self._state

    def configure(self) -> dict[str, Any]:
        """Ask the strategy for the next round's worker config (JSON: it travels in replies)."""
        config = self.strategy.configure_round(self.version + 1, self._state)
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise UsageError(
                f"strategy {self.name}: configure_round must return a mapping, got {type(config).__name__}"
            )
        try:
            json.dumps(dict(config))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"strategy {self.name}: configure_round must return JSON values ({exc})") from exc
        self.config = dict(config)
        return self.config

    # -- collecting a round ---------------------------------------------------------------

    def add(self, worker: str, unpacked: wire.Unpacked, weight: int, version: int, start: torch.Tensor) -> None:
        """One worker's contribution to the current round or step (already checked fresh)."""
        if self.streaming:
            self._sum.add(unpacked, weight)
        else:
            self._held.append(self._public(worker, unpacked, weight, version, start))

    def close(self, start: torch.Tensor) -> dict[str, float]:
        """Aggregate what was added; the model holds the next version. Returns the strategy's metrics."""
        round_ = self.version + 1
        if self.streaming:
            mean = self._sum.mean(self.kind, self.version, start)
            self._sum = Accumulator(self.layout, self.device)
            metrics = self.strategy.aggregate_mean(round_, mean)
            new: Mapping[str, Any] = {}
        else:
            held, self._held = self._held, []
            new, metrics = _pair(self.name, self.strategy.aggregate(round_, held))
        self._load(new)
        self.version += 1
        self._check_version()
        return _metrics(self.name, metrics)

    def apply_async(
        self, worker: str, unpacked: wire.Unpacked, weight: int, version: int
    ) -> tuple[bool, dict[str, float]]:
        """An asynchronous strategy's step with one gradient; (accepted, metrics)."""
        round_ = self.version + 1
        if self.streaming:
            contribution = self.layout.contribution(
                unpacked, kind=GradContribution, worker=worker, weight=weight, version=version
            )
            metrics: Any = self.strategy.aggregate_mean(round_, contribution)
            new: Mapping[str, Any] = {}
        else:
            public = self._public(worker, unpacked, weight, version, None)
            new, metrics = _pair(self.name, self.strategy.aggregate(round_, [public]))
        metrics = _metrics(self.name, metrics)
        if metrics.get("accepted", 1.0) == 0.0:
            return False, metrics
        self._load(new)
        self.version += 1
        self._check_version()
        return True, metrics

    def evaluate(self) -> dict[str, float] | None:
        """The strategy's own evaluation of the global state, when it has one."""
        evaluate = getattr(self.strategy, "evaluate", None)
        if not callable(evaluate):
            return None
        result = evaluate(self.version, self._state)
        return None if result is None else _metrics(self.name, result)

    @property
    def evaluates(self) -> bool:
        return callable(getattr(self.strategy, "evaluate", None))

    def stop_reason(self) -> str | None:
        """Why the strategy ends the run at the current version (its optional hook), if it does."""
        hook = getattr(self.strategy, "stop_reason", None)
        if not callable(hook):
            return None
        reason = hook()
        if reason is not None and not (isinstance(reason, str) and reason):
            raise UsageError(f"strategy {self.name}: stop_reason() must return a non-empty str or None, got {reason!r}")
        return reason

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = self.strategy.state_dict()
        out: dict[str, Any] = {"name": self.name, "version": self.version, "strategy": state}
        if not (isinstance(state, Mapping) and "model" in state):  # built-ins keep the model themselves
            out["model"] = model_state(self.model)
        return out

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Continue from `state_dict()`; a checkpoint of another strategy or parameters is refused."""
        if not isinstance(saved, Mapping) or not {"name", "version", "strategy"} <= set(saved):
            raise FormatError("checkpoint lacks the strategy's name, version or state")
        if saved["name"] != self.name:
            raise ConfigError(f"checkpoint is of strategy {saved['name']!r}, this job runs {self.name!r}")
        version = saved["version"]
        if not is_int(version) or version < 0:
            raise FormatError(f"checkpoint version must be an int >= 0, got {version!r}")
        self.strategy.load_state_dict(saved["strategy"])
        if "model" in saved:
            load_state(self.model, saved["model"])
        self.version = version
        self._check_version()

    # -- helpers --------------------------------------------------------------------------

    def _check_version(self) -> None:
        own = getattr(self.strategy, "version", None)
        if is_int(own) and own != self.version:
            raise FormatError(f"strategy {self.name} is at version {own}, the server at {self.version}")

    def _public(
        self, worker: str, unpacked: wire.Unpacked, weight: int, version: int, start: torch.Tensor | None
    ) -> Contribution:
        """A contribution as the contract's numpy Contribution (tables dense, updates as deltas)."""
        layout = self.layout
        dense = unpacked.dense.detach().cpu()
        if self.kind == "update":
            assert start is not None
            dense = dense - start[: layout.num_updates].to(dense.dtype)
        update: dict[str, np.ndarray] = {}
        for entry in layout.updates:
            update[entry.name] = dense[entry.offset : entry.end].reshape(entry.shape).numpy().copy()
        for name, (index, values) in unpacked.rows.items():
            update[name] = SparseRows(index.cpu(), values.cpu(), layout.tables[name][0]).to_dense().numpy()
        ints = unpacked.ints.cpu()
        for entry in layout.ints:
            update[entry.name] = ints[entry.offset : entry.end].reshape(entry.shape).numpy().copy()
        return Contribution(worker, weight, update, version)

    def _load(self, new: Mapping[str, Any]) -> None:
        if not new:
            return
        live = self._state._live
        unknown = sorted(set(new) - set(live))
        if unknown:
            raise UsageError(f"strategy {self.name} returned values for names the model does not have: {unknown[:5]}")
        with torch.no_grad():
            for name, value in new.items():
                target = live[name]
                array = np.asarray(value)
                if tuple(array.shape) != tuple(target.shape):
                    raise UsageError(
                        f"strategy {self.name} returned {name!r} of shape {list(array.shape)}, "
                        f"the model has {list(target.shape)}"
                    )
                if not np.all(np.isfinite(array)):
                    raise UsageError(f"strategy {self.name} returned NaN or infinite values for {name!r}")
                target.copy_(torch.as_tensor(np.array(array, dtype=_np_dtype(target))))


def _np_dtype(tensor: torch.Tensor) -> np.dtype:
    return torch.empty(0, dtype=tensor.dtype).numpy().dtype


def _pair(name: str, result: Any) -> tuple[Mapping[str, Any], Any]:
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Mapping)):
        raise UsageError(f"strategy {name}: aggregate must return (new_state mapping, metrics mapping)")
    return result[0], result[1]


def _metrics(name: str, metrics: Any) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise UsageError(f"strategy {name}: metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not (is_number(value) or isinstance(value, np.number)):
            raise UsageError(f"strategy {name}: metric {key!r} must be a number, got {value!r}")
        out[str(key)] = float(value)
    return out
