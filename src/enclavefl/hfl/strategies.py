"""Server-side strategies of horizontal FL, and the worker-side helpers that feed them.

A strategy owns the global model (its parameters and persistent buffers), the server
optimizer and a version: the number of server updates so far (optimizer steps for
`sync-sgd`/`async-sgd`, rounds for `fedavg`/`fedprox`/`fedadam`). Workers pull the
global state at some version, compute on their own rows, and send a contribution
tagged with that version. Strategies aggregate whatever subset of workers contributed;
quorum and timeouts belong to the parameter-server role.

* `SyncSGD.apply_step`: gradients of one step averaged, weighted by batch size, then one
  server optimizer step. Equals one process training on the union of the batches with
  a mean-reduced loss (BatchNorm then normalizes each worker's batch by its own
  statistics, like ghost batch norm).
* `AsyncSGD.apply_gradient`: each gradient stepped as it arrives; see its docstring for
  the staleness rule.
* `FedAvg`, `FedProx`, `FedAdam` `.apply_round`: workers train locally and send the
  change of their parameters (deltas); the server averages them weighted by
  num_examples, then FedAvg/FedProx add the average and FedAdam takes an Adam step on
  it (Reddi et al. 2021, Algorithm 2). FedProx adds its proximal term on the worker
  (`enclavefl.train.torch.proximal_term`, with the `mu` of the round's config); its server
  side is FedAvg's.

Buffers: workers send buffer deltas too (their buffers after the step or round minus the
ones they pulled). Floating-point buffers (BatchNorm running_mean/var) get the weighted
average of the deltas added; as every worker started from the same buffers, that is the
weighted average of the workers' buffers. For sync-sgd, running_mean is then exactly
what BatchNorm over the union batch would give, while running_var is the weighted mean
of the per-worker variances, lower than the union's by the spread of the workers' means.
Integer buffers (num_batches_tracked) count the batches the global model was trained on:
sync-sgd adds the largest increment (one step is one union batch); async-sgd and the
round strategies add every worker's increment. Names no contribution carries are left
unchanged; contributions of one aggregation must carry the same names.

Embedding tables travel as `SparseRows`; how the server optimizer applies them is
explained in `enclavefl.hfl.sparse`. Strategies are not thread-safe: the parameter-server
role serializes its calls.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from enclavefl.errors import ConfigError, FormatError, UsageError
from enclavefl.hfl import contract, sparse
from enclavefl.hfl.sparse import SparseRows
from enclavefl.hfl.state import (
    buffer_names,
    check_like,
    check_state,
    embedding_names,
    load_state,
    model_state,
)
from enclavefl.train.optim import PlainOptimizer, plain_sgd_factory
from enclavefl.validate import is_int, is_number

__all__ = [
    "AsyncResult",
    "AsyncSGD",
    "Contribution",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "GradContribution",
    "NoContributions",
    "OptimizerFactory",
    "RoundStrategy",
    "StaleContribution",
    "Strategy",
    "SyncSGD",
    "Update",
    "UpdateContribution",
    "grad_contribution",
    "sgd",
    "update_contribution",
]

Update = torch.Tensor | SparseRows
ServerOptimizer = torch.optim.Optimizer | PlainOptimizer
OptimizerFactory = Callable[[nn.Module], ServerOptimizer | Sequence[ServerOptimizer]]
StalenessPolicy = Literal["refuse", "down-weight"]
STALENESS_POLICIES: tuple[str, ...] = ("refuse", "down-weight")


class NoContributions(UsageError):
    """An aggregation was asked for with no contribution at all."""


class StaleContribution(UsageError):
    """A contribution computed at another version than the strategy accepts."""

    def __init__(self, reason: str, *, worker: str, version: int, server_version: int) -> None:
        super().__init__(reason)
        self.worker = worker
        self.version = version
        self.server_version = server_version


@dataclass(frozen=True, eq=False)
class GradContribution:
    """One worker's mean-loss gradients of one batch, computed at global `version`."""

    worker: str
    batch_size: int
    grads: Mapping[str, Update]
    version: int
    buffer_deltas: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def weight(self) -> int:
        return self.batch_size

    @property
    def updates(self) -> Mapping[str, Update]:
        return self.grads


@dataclass(frozen=True, eq=False)
class UpdateContribution:
    """One worker's parameter deltas after local training from global `version` (a round)."""

    worker: str
    num_examples: int
    deltas: Mapping[str, Update]
    version: int
    buffer_deltas: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def weight(self) -> int:
        return self.num_examples

    @property
    def updates(self) -> Mapping[str, Update]:
        return self.deltas


Contribution = GradContribution | UpdateContribution


@dataclass(frozen=True)
class AsyncResult:
    """What `AsyncSGD.apply_gradient` did with one gradient."""

    accepted: bool
    version: int
    staleness: int
    weight: float
    reason: str = ""


# -- hyper-parameter checks ---------------------------------------------------------


def _number(field_name: str, value: object) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise UsageError(f"{field_name} must be a finite number, got {value!r}")
    return float(value)


def _positive(field_name: str, value: object) -> float:
    number = _number(field_name, value)
    if number <= 0:
        raise UsageError(f"{field_name} must be > 0, got {value!r}")
    return number


def _non_negative(field_name: str, value: object) -> float:
    number = _number(field_name, value)
    if number < 0:
        raise UsageError(f"{field_name} must be >= 0, got {value!r}")
    return number


def _unit_interval(field_name: str, value: object) -> float:
    number = _number(field_name, value)
    if not 0 <= number < 1:
        raise UsageError(f"{field_name} must be in [0, 1), got {value!r}")
    return number


def sgd(lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0) -> OptimizerFactory:
    """A factory of torch.optim.SGD over the model's trainable parameters."""
    lr = _positive("lr", lr)
    momentum = _unit_interval("momentum", momentum)
    weight_decay = _non_negative("weight_decay", weight_decay)

    def make(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    return make


# -- aggregation --------------------------------------------------------------------


def _average(updates: Sequence[Mapping[str, Update]], weights: Sequence[float]) -> dict[str, Update]:
    """Weighted average per name; SparseRows stay sparse unless some worker sent it dense."""
    total = float(sum(weights))
    out: dict[str, Update] = {}
    for name in updates[0]:
        values = [u[name] for u in updates]
        if all(isinstance(v, SparseRows) for v in values):
            out[name] = sparse.weighted_average(values, weights)  # type: ignore[arg-type]
            continue
        dense = [v.to_dense() if isinstance(v, SparseRows) else v for v in values]
        acc = torch.zeros_like(dense[0])
        with torch.no_grad():
            for value, weight in zip(dense, weights, strict=False):
                acc.add_(value, alpha=weight / total)
        out[name] = acc
    return out


def _check_update(what: str, tensor: object, like: torch.Tensor) -> None:
    """Like check_like, but a floating-point target also takes a float64 update (the server's exact mean)."""
    if (
        isinstance(tensor, torch.Tensor)
        and like.is_floating_point()
        and tensor.dtype == torch.float64
        and not tensor.is_sparse
        and tensor.shape == like.shape
    ):
        return
    check_like(what, tensor, like)


def _average_buffers(
    contributions: Sequence[Contribution], *, integer_rule: Literal["max", "sum"]
) -> dict[str, torch.Tensor]:
    """Buffer deltas of several contributions as one: weighted mean (floats), max or sum (integers)."""
    weights = [c.weight for c in contributions]
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for name in contributions[0].buffer_deltas:
        deltas = [c.buffer_deltas[name] for c in contributions]
        if deltas[0].is_floating_point():
            zero = torch.zeros_like(deltas[0], dtype=torch.float64)
            out[name] = sum((d.double() * (w / total) for d, w in zip(deltas, weights, strict=False)), zero)
        elif integer_rule == "max":
            out[name] = torch.stack(deltas).amax(dim=0)
        else:
            out[name] = torch.stack(deltas).sum(dim=0)
    return out


class Strategy(ABC):
    """A built-in strategy: owns the global model, the server optimizer state and the version.

    It has the hooks of `enclavefl.hfl.contract` (so the parameter server drives it like
    any user strategy) and updates the model it was given in place, so `aggregate`
    returns no new values; `aggregate_mean` is the parameter server's fast path.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    contribution_type: ClassVar[type[GradContribution] | type[UpdateContribution]]

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.version = 0
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        all_buffers = dict(model.named_buffers())
        self._buffers = {n: all_buffers[n] for n in buffer_names(model)}

    # Subclasses: hyper-parameters a checkpoint must agree with, and optimizer state.
    def hyper(self) -> dict[str, Any]:
        return {}

    # -- the strategy contract (enclavefl.hfl.contract) --

    def configure_round(self, round: int, state: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Settings the workers need for `round` (none, unless a subclass says so)."""
        return {}

    def aggregate(
        self, round: int, contributions: Sequence[contract.Contribution]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Apply numpy contributions (see `aggregate_mean`); the model changes in place."""
        internal = [self._internal(c) for c in contributions]
        if len(internal) == 1:
            return {}, self.aggregate_mean(round, internal[0])
        weights = [c.weight for c in internal]
        mean = self.contribution_type(
            "aggregate",
            sum(weights),
            _average([c.updates for c in internal], weights),
            internal[0].version,
            _average_buffers(internal, integer_rule=self._integer_rule),
        )
        self._check(internal, allow_stale=False)
        return {}, self.aggregate_mean(round, mean)

    @abstractmethod
    def aggregate_mean(self, round: int, mean: Contribution) -> dict[str, float]:
        """Apply the weighted mean of one aggregation's contributions (asynchronous: the one)."""

    _integer_rule: ClassVar[Literal["max", "sum"]] = "sum"

    def _internal(self, c: contract.Contribution) -> Contribution:
        """A numpy contribution as torch tensors on the model's device."""
        device = next((p.device for p in self._params.values()), torch.device("cpu"))
        updates: dict[str, Update] = {}
        buffers: dict[str, torch.Tensor] = {}
        tables = embedding_names(self.model)
        for name, value in c.update.items():
            tensor = torch.as_tensor(np.asarray(value)).to(device)
            if name in self._buffers:
                buffers[name] = tensor.to(self._buffers[name].dtype)
            elif name in tables:
                updates[name] = SparseRows.from_dense(tensor.to(self._params[name].dtype))
            else:
                updates[name] = tensor
        return self.contribution_type(c.worker, c.num_examples, updates, c.version, buffers)

    @abstractmethod
    def _optimizer_state(self) -> Any: ...

    @abstractmethod
    def _check_optimizer_state(self, state: Any) -> None: ...

    @abstractmethod
    def _load_optimizer_state(self, state: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (no shared tensors) of everything needed to continue exactly."""
        return {
            "strategy": self.name,
            "version": self.version,
            "hyper": self.hyper(),
            "model": model_state(self.model),
            "server_optimizer": self._optimizer_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()` of the same strategy and hyper-parameters."""
        missing = sorted({"strategy", "version", "hyper", "model", "server_optimizer"} - set(state))
        if missing:
            raise FormatError(f"strategy checkpoint lacks {missing}")
        if not isinstance(state["hyper"], Mapping):
            raise FormatError(f"checkpoint hyper must be a mapping, got {type(state['hyper']).__name__}")
        if state["strategy"] != self.name:
            raise ConfigError(f"checkpoint is of strategy {state['strategy']!r}, this job runs {self.name!r}")
        for key, mine in self.hyper().items():
            if state["hyper"].get(key) != mine:
                raise ConfigError(
                    f"checkpoint hyper-parameter {key}={state['hyper'].get(key)!r} differs from "
                    f"this job's {key}={mine!r}"
                )
        version = state["version"]
        if not is_int(version) or version < 0:
            raise FormatError(f"checkpoint version must be an int >= 0, got {version!r}")
        check_state(self.model, state["model"])
        self._check_optimizer_state(state["server_optimizer"])
        load_state(self.model, state["model"])
        self._load_optimizer_state(state["server_optimizer"])
        self.version = version

    # -- contribution checks --

    def _check(self, contributions: Sequence[Contribution], *, allow_stale: bool) -> None:
        if not contributions:
            raise NoContributions(f"{self.name}: cannot aggregate zero contributions (version {self.version})")
        for c in contributions:
            if not isinstance(c, self.contribution_type):
                raise UsageError(f"{self.name} takes {self.contribution_type.__name__}, got {type(c).__name__}")
        workers = [c.worker for c in contributions]
        duplicates = sorted({w for w in workers if workers.count(w) > 1})
        if duplicates:
            raise UsageError(f"{self.name}: more than one contribution from worker(s) {duplicates}")
        first = contributions[0]
        for c in contributions:
            self._check_version(c, allow_stale=allow_stale)
            if not is_int(c.weight) or c.weight < 1:
                raise UsageError(
                    f"worker {c.worker!r}: batch size / num_examples must be an int >= 1, got {c.weight!r}"
                )
            for kind, got, want in (
                ("updates", set(c.updates), set(first.updates)),
                ("buffer deltas", set(c.buffer_deltas), set(first.buffer_deltas)),
            ):
                if got != want:
                    raise UsageError(
                        f"worker {c.worker!r} sent {kind} for {sorted(got ^ want)} unlike worker "
                        f"{first.worker!r}: contributions of one aggregation must carry the same names"
                    )
            self._check_tensors(c)

    def _check_version(self, c: Contribution, *, allow_stale: bool) -> None:
        if c.version > self.version or (c.version < self.version and not allow_stale):
            raise StaleContribution(
                f"{self.name}: worker {c.worker!r} contributed at version {c.version}, "
                f"the server is at version {self.version}",
                worker=c.worker,
                version=c.version,
                server_version=self.version,
            )

    def _check_tensors(self, c: Contribution) -> None:
        for name, value in c.updates.items():
            if name not in self._params:
                raise UsageError(f"worker {c.worker!r} sent an update for unknown parameter {name!r}")
            target = self._params[name]
            if isinstance(value, SparseRows):
                if value.shape != target.shape or value.dtype != target.dtype:
                    raise UsageError(
                        f"worker {c.worker!r} parameter {name!r}: rows of a {value.dtype} "
                        f"{list(value.shape)} table, expected {target.dtype} {list(target.shape)}"
                    )
            else:
                _check_update(f"worker {c.worker!r} parameter {name!r}", value, target)
        for name, value in c.buffer_deltas.items():
            if name not in self._buffers:
                raise UsageError(f"worker {c.worker!r} sent a delta for unknown buffer {name!r}")
            _check_update(f"worker {c.worker!r} buffer {name!r}", value, self._buffers[name])

    def _apply_buffer_deltas(self, contributions: Sequence[Contribution], integer_rule: Literal["max", "sum"]) -> None:
        weights = [c.weight for c in contributions]
        total = float(sum(weights))
        with torch.no_grad():
            for name in contributions[0].buffer_deltas:
                target = self._buffers[name]
                deltas = [c.buffer_deltas[name] for c in contributions]
                if target.is_floating_point():
                    if len(deltas) == 1:  # in the delta's precision (the server's mean is float64)
                        target.copy_(target.to(deltas[0].dtype).add_(deltas[0]))
                        continue
                    for delta, weight in zip(deltas, weights, strict=False):
                        target.add_(delta.to(target.dtype), alpha=weight / total)
                elif integer_rule == "max":
                    target.add_(torch.stack(deltas).amax(dim=0))
                else:
                    target.add_(torch.stack(deltas).sum(dim=0))


class _GradientStrategy(Strategy):
    """Strategies whose workers send gradients and whose server runs an optimizer (built in: `PlainSGD`)."""

    kind = "grad"
    contribution_type = GradContribution

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory | None) -> None:
        super().__init__(model)
        made = (optimizer_factory or sgd())(model)
        self.optimizers: tuple[ServerOptimizer, ...] = (
            (made,) if isinstance(made, torch.optim.Optimizer | PlainOptimizer) else tuple(made)
        )
        names = {id(p): n for n, p in self._params.items()}
        self._grad_form: dict[str, sparse.GradForm] = {}
        for optimizer in self.optimizers:
            if not isinstance(optimizer, torch.optim.Optimizer | PlainOptimizer):
                raise UsageError(f"the optimizer factory returned {type(optimizer).__name__}, not a torch optimizer")
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in names:
                        raise UsageError("the server optimizer holds a tensor that is not a trainable model parameter")
                    if names[id(p)] in self._grad_form:
                        raise UsageError(f"parameter {names[id(p)]!r} is held by more than one server optimizer")
                    self._grad_form[names[id(p)]] = sparse.grad_form(optimizer)
        uncovered = sorted(set(self._params) - set(self._grad_form))
        if uncovered:
            raise UsageError(f"the server optimizer does not hold parameters {uncovered}")

    def _step(self, grads: Mapping[str, Update], scale: float) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        for name, grad in grads.items():
            if scale != 1.0:
                grad = grad.scaled(scale) if isinstance(grad, SparseRows) else grad * scale
            if isinstance(grad, torch.Tensor):
                grad = grad.to(self._params[name].dtype)
            self._params[name].grad = sparse.as_grad(grad, self._grad_form[name])
        for optimizer in self.optimizers:
            optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def _optimizer_state(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(o.state_dict()) for o in self.optimizers]

    def _check_optimizer_state(self, state: Any) -> None:
        if not isinstance(state, list) or len(state) != len(self.optimizers):
            raise ConfigError(
                f"checkpoint holds {len(state) if isinstance(state, list) else 'no list of'} server "
                f"optimizer states, this job has {len(self.optimizers)}"
            )
        for i, (saved, optimizer) in enumerate(zip(state, self.optimizers, strict=False)):
            groups = saved.get("param_groups") if isinstance(saved, dict) else None
            if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
                raise ConfigError(f"checkpoint server optimizer {i} does not match this job's parameter groups")
            for j, (saved_group, group) in enumerate(zip(groups, optimizer.param_groups, strict=False)):
                for key, mine in group.items():
                    if key != "params" and saved_group.get(key) != mine:
                        raise ConfigError(
                            f"checkpoint server optimizer {i} group {j}: {key}={saved_group.get(key)!r} "
                            f"differs from this job's {key}={mine!r}"
                        )

    def _load_optimizer_state(self, state: list[dict[str, Any]]) -> None:
        for saved, optimizer in zip(state, self.optimizers, strict=False):
            optimizer.load_state_dict(copy.deepcopy(saved))


class SyncSGD(_GradientStrategy):
    """`sync-sgd`: each step averages every contributing worker's gradient by batch size."""

    name = "sync-sgd"
    _integer_rule = "max"

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory | None = None) -> None:
        super().__init__(model, optimizer_factory)

    @classmethod
    def from_params(cls, model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> SyncSGD:
        return cls(model, plain_sgd_factory(lr, momentum, weight_decay))

    def aggregate_mean(self, round: int, mean: Contribution) -> dict[str, float]:
        assert isinstance(mean, GradContribution)
        self.apply_step([mean])
        return {}

    def apply_step(self, contributions: Sequence[GradContribution]) -> int:
        """One server step from the contributions of this version; returns the new version."""
        self._check(contributions, allow_stale=False)
        self._step(_average([c.grads for c in contributions], [c.batch_size for c in contributions]), 1.0)
        self._apply_buffer_deltas(contributions, "max")
        self.version += 1
        return self.version


class AsyncSGD(_GradientStrategy):
    """`async-sgd`: one server step per gradient, as gradients arrive.

    A gradient computed at version v reaching the server at version V has staleness
    V - v. Beyond `max_staleness` it is always refused: `apply_gradient` returns an
    AsyncResult with accepted=False and the model is unchanged. Within the bound,
    `staleness_policy="refuse"` applies it at full weight and "down-weight" multiplies
    it by 1 / (1 + staleness) before the optimizer step (staleness-aware async SGD).
    Buffer deltas of an accepted gradient are added unscaled.
    """

    name = "async-sgd"
    asynchronous = True

    def __init__(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory | None = None,
        *,
        max_staleness: int,
        staleness_policy: StalenessPolicy = "refuse",
    ) -> None:
        if not is_int(max_staleness) or max_staleness < 0:
            raise UsageError(f"max_staleness must be an int >= 0, got {max_staleness!r}")
        if staleness_policy not in STALENESS_POLICIES:
            raise UsageError(f"staleness_policy must be one of {list(STALENESS_POLICIES)}, got {staleness_policy!r}")
        super().__init__(model, optimizer_factory)
        self.max_staleness = max_staleness
        self.staleness_policy = staleness_policy

    def hyper(self) -> dict[str, Any]:
        return {"max_staleness": self.max_staleness, "staleness_policy": self.staleness_policy}

    @classmethod
    def from_params(
        cls,
        model: nn.Module,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        max_staleness: int,
        staleness_policy: StalenessPolicy,
    ) -> AsyncSGD:
        return cls(model, plain_sgd_factory(lr, momentum, weight_decay), max_staleness=max_staleness,
                   staleness_policy=staleness_policy)  # fmt: skip

    def aggregate_mean(self, round: int, mean: Contribution) -> dict[str, float]:
        assert isinstance(mean, GradContribution)
        result = self.apply_gradient(mean)
        return {"accepted": float(result.accepted), "staleness": float(result.staleness), "weight": result.weight}

    def aggregate(
        self, round: int, contributions: Sequence[contract.Contribution]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if len(contributions) != 1:
            raise UsageError(f"async-sgd applies one gradient at a time, got {len(contributions)}")
        return {}, self.aggregate_mean(round, self._internal(contributions[0]))

    def apply_gradient(self, contribution: GradContribution) -> AsyncResult:
        self._check([contribution], allow_stale=True)
        staleness = self.version - contribution.version
        if staleness > self.max_staleness:
            return AsyncResult(
                accepted=False,
                version=self.version,
                staleness=staleness,
                weight=0.0,
                reason=f"staleness {staleness} > max_staleness {self.max_staleness}",
            )
        weight = 1.0 / (1 + staleness) if self.staleness_policy == "down-weight" else 1.0
        self._step(_average([contribution.grads], [1]), weight)
        self._apply_buffer_deltas([contribution], "sum")
        self.version += 1
        return AsyncResult(accepted=True, version=self.version, staleness=staleness, weight=weight)


class RoundStrategy(Strategy):
    """Round-based strategies: workers train locally and send deltas + num_examples."""

    kind = "update"
    contribution_type = UpdateContribution

    @classmethod
    def from_params(cls, model: nn.Module, **params: Any) -> RoundStrategy:
        return cls(model, **params)

    def aggregate_mean(self, round: int, mean: Contribution) -> dict[str, float]:
        assert isinstance(mean, UpdateContribution)
        self.apply_round([mean])
        return {}

    def apply_round(self, contributions: Sequence[UpdateContribution]) -> int:
        """Aggregate this round's contributions; returns the new version (rounds done)."""
        self._check(contributions, allow_stale=False)
        average = _average([c.deltas for c in contributions], [c.num_examples for c in contributions])
        with torch.no_grad():
            self._apply_delta(average)
        self._apply_buffer_deltas(contributions, "sum")
        self.version += 1
        return self.version

    @abstractmethod
    def _apply_delta(self, delta: Mapping[str, Update]) -> None: ...


class FedAvg(RoundStrategy):
    """`fedavg`: the new global parameters are the num_examples-weighted mean of the workers'."""

    name = "fedavg"

    def _apply_delta(self, delta: Mapping[str, Update]) -> None:
        for name, value in delta.items():
            param = self._params[name]
            if isinstance(value, SparseRows):
                sparse.add_rows(param, value)
            elif value.dtype != param.dtype:
                # The server's mean comes in float64: adding there and rounding once gives a
                # single worker's weights back bit for bit.
                param.copy_(param.to(value.dtype).add_(value))
            else:
                param.add_(value)

    def _optimizer_state(self) -> dict[str, Any]:
        return {}

    def _check_optimizer_state(self, state: Any) -> None:
        if state != {}:
            raise FormatError(
                f"{self.name} keeps no server optimizer state, the checkpoint holds {type(state).__name__}"
            )

    def _load_optimizer_state(self, state: Any) -> None:
        return None


class FedProx(FedAvg):
    """`fedprox`: FedAvg on the server; workers add the proximal term with `mu` (sent in each round's config)."""

    name = "fedprox"

    def __init__(self, model: nn.Module, mu: float) -> None:
        super().__init__(model)
        self.mu = _non_negative("mu", mu)

    def hyper(self) -> dict[str, Any]:
        return {"mu": self.mu}

    def configure_round(self, round: int, state: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Workers add the proximal term (mu / 2) ||w - w_global||^2 to their loss."""
        return {"mu": self.mu}


class FedAdam(RoundStrategy):
    """`fedadam` (Reddi et al. 2021, Algorithm 2) on the averaged delta D of each round.

    m = beta1 m + (1 - beta1) D;  v = beta2 v + (1 - beta2) D^2;  x += lr m / (sqrt(v) + tau),
    starting from m = 0 and v = tau^2, without bias correction, as in the paper. A sparse
    table's delta is densified: rows no worker touched have D = 0 but still move by m.
    """

    name = "fedadam"

    def __init__(
        self, model: nn.Module, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(model)
        self.lr = _positive("lr", lr)
        self.beta1 = _unit_interval("beta1", beta1)
        self.beta2 = _unit_interval("beta2", beta2)
        self.tau = _positive("tau", tau)
        self._m = {n: torch.zeros_like(p, requires_grad=False) for n, p in self._params.items()}
        self._v = {n: torch.full_like(p, self.tau**2, requires_grad=False) for n, p in self._params.items()}

    @classmethod
    def from_params(cls, model: nn.Module, **params: Any) -> FedAdam:
        server_lr = params.pop("server_lr")
        return cls(model, lr=server_lr, **params)

    def hyper(self) -> dict[str, Any]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def _apply_delta(self, delta: Mapping[str, Update]) -> None:
        for name, value in delta.items():
            d = value.to_dense() if isinstance(value, SparseRows) else value
            d = d.to(self._params[name].dtype)
            m, v = self._m[name], self._v[name]
            m.mul_(self.beta1).add_(d, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(d, d, value=1 - self.beta2)
            self._params[name].addcdiv_(m, v.sqrt().add_(self.tau), value=self.lr)

    def _optimizer_state(self) -> dict[str, Any]:
        return {
            "m": {n: t.clone() for n, t in self._m.items()},
            "v": {n: t.clone() for n, t in self._v.items()},
        }

    def _check_optimizer_state(self, state: Any) -> None:
        for key, mine in (("m", self._m), ("v", self._v)):
            saved = state.get(key) if isinstance(state, dict) else None
            if not isinstance(saved, dict) or set(saved) != set(mine):
                raise FormatError(f"checkpoint fedadam state {key!r} does not name this model's parameters")
            for name, tensor in mine.items():
                check_like(f"checkpoint fedadam {key}[{name!r}]", saved[name], tensor)

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        for key, mine in (("m", self._m), ("v", self._v)):
            for name, tensor in mine.items():
                tensor.copy_(state[key][name])


# -- worker side ----------------------------------------------------------------------


def _buffer_deltas(model: nn.Module, start: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buffers = dict(model.named_buffers())
    return {name: buffers[name].detach() - _start(start, name) for name in buffer_names(model)}


def _start(start: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in start:
        raise UsageError(f"the pulled global state has no {name!r}")
    return start[name]


def grad_contribution(
    model: nn.Module, start: Mapping[str, torch.Tensor], *, worker: str, batch_size: int, version: int
) -> GradContribution:
    """A worker's contribution after `loss.backward()` on one batch (mean-reduced loss).

    `start` is the global state (`model_state`) the worker loaded at `version`. Sparse
    gradients and embedding tables travel as SparseRows (a dense table gradient is reduced
    to its nonzero rows).
    """
    tables = embedding_names(model)
    grads: dict[str, Update] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or p.grad is None:
            continue
        if p.grad.is_sparse:
            grads[name] = SparseRows.from_torch_sparse(p.grad)
        elif name in tables:
            grads[name] = SparseRows.from_dense(p.grad)
        else:
            grads[name] = p.grad.detach().clone()
    return GradContribution(worker, batch_size, grads, version, _buffer_deltas(model, start))


def update_contribution(
    model: nn.Module, start: Mapping[str, torch.Tensor], *, worker: str, num_examples: int, version: int
) -> UpdateContribution:
    """A worker's contribution after local training from the global state `start` at `version`.

    Embedding tables travel as the SparseRows of the rows that changed.
    """
    tables = embedding_names(model)
    deltas: dict[str, Update] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        delta = p.detach() - _start(start, name)
        deltas[name] = SparseRows.from_dense(delta) if name in tables else delta
    return UpdateContribution(worker, num_examples, deltas, version, _buffer_deltas(model, start))
