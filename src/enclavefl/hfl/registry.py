"""Strategies by name: one table of name -> (class, pydantic parameter model).

The job file, `make_strategy` and the docs all read this table; a strategy outside the
package is named `package.module:Class` and brings its own parameter model as a
`Params` class attribute (a pydantic BaseModel; without one, parameters go to its
constructor unchecked).

Importing this module imports neither torch nor the strategies: classes are loaded
when a strategy is built, so validating a job file stays cheap.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from enclavefl.errors import ConfigError, UsageError

__all__ = [
    "BUILTIN",
    "AsyncSGDParams",
    "FedAdamParams",
    "FedProxParams",
    "NoParams",
    "ServerSGDParams",
    "StrategyEntry",
    "build_strategy",
    "entry_for_class",
    "TrimmedMeanParams",
    "lookup",
    "make_strategy",
    "strategy_class",
    "validate_params",
]

REF = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NoParams(_Params):
    """A strategy without parameters."""


class ServerSGDParams(_Params):
    """The server's SGD that applies the workers' gradients (sgd strategies)."""

    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class AsyncSGDParams(ServerSGDParams):
    max_staleness: int = Field(4, ge=0)
    """A gradient computed on a model more than this many versions old is dropped."""
    staleness_policy: Literal["refuse", "down-weight"] = "refuse"
    """Within max_staleness: refuse: full weight; down-weight: scaled by 1/(1 + staleness)."""


class FedProxParams(_Params):
    mu: float = Field(ge=0)
    """Weight of the workers' proximal term (mu / 2) ||w - w_global||^2, sent to them in the round config."""


class FedAdamParams(_Params):
    """FedAdam (Reddi et al. 2021): the server's Adam step on the averaged delta."""

    server_lr: float = Field(1e-2, gt=0, validation_alias=AliasChoices("server_lr", "lr"))
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    """Adaptivity (epsilon)."""


class TrimmedMeanParams(_Params):
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    """Fraction of the workers' values cut from each end, per coordinate, before averaging."""


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy: where its class is, its parameters, and whether it runs rounds or steps."""

    name: str
    target: str
    params: type[BaseModel]
    kind: Literal["update", "grad"]

    @property
    def unit(self) -> str:
        return "round" if self.kind == "update" else "step"


BUILTIN: dict[str, StrategyEntry] = {
    entry.name: entry
    for entry in (
        StrategyEntry("sync-sgd", "enclavefl.hfl.strategies:SyncSGD", ServerSGDParams, "grad"),
        StrategyEntry("async-sgd", "enclavefl.hfl.strategies:AsyncSGD", AsyncSGDParams, "grad"),
        StrategyEntry("fedavg", "enclavefl.hfl.strategies:FedAvg", NoParams, "update"),
        StrategyEntry("fedprox", "enclavefl.hfl.strategies:FedProx", FedProxParams, "update"),
        StrategyEntry("fedadam", "enclavefl.hfl.strategies:FedAdam", FedAdamParams, "update"),
        StrategyEntry("median", "enclavefl.hfl.robust:CoordinateMedian", NoParams, "update"),
        StrategyEntry("trimmed-mean", "enclavefl.hfl.robust:TrimmedMean", TrimmedMeanParams, "update"),
    )
}


def lookup(name: str) -> StrategyEntry:
    """The entry of a built-in name or of a `module:Class` (whose module is imported)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if not REF.fullmatch(name):
        raise ConfigError(f"unknown strategy {name!r}; choose one of {list(BUILTIN)} or give 'package.module:Class'")
    return entry_for_class(name, _load(name))


def entry_for_class(name: str, cls: type) -> StrategyEntry:
    """The entry of a user's strategy class (loaded by the caller), named `name`."""
    params = getattr(cls, "Params", None)
    if params is not None and not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise ConfigError(f"strategy {name}: Params must be a pydantic BaseModel, got {params!r}")
    kind = getattr(cls, "kind", "update")
    if kind not in ("update", "grad"):
        raise ConfigError(f"strategy {name}: kind must be 'update' or 'grad', got {kind!r}")
    return StrategyEntry(name, name, params or NoParams, kind)  # type: ignore[arg-type]


def strategy_class(entry: StrategyEntry) -> type:
    return _load(entry.target)


def validate_params(entry: StrategyEntry, params: dict[str, Any], *, raw: bool = False) -> dict[str, Any]:
    """The strategy's parameters, checked by its model (ConfigError listing every problem)."""
    if raw:
        return dict(params)
    try:
        return entry.params.model_validate(params).model_dump()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ConfigError(f"strategy {entry.name}: {problems}") from None


def make_strategy(name: str, model: Any = None, **params: Any) -> Any:
    """Build a strategy by its registry name (or `module:Class`) with checked parameters.

    Built-in strategies hold the server's `model`; a `module:Class` strategy is built as
    `Class(**params)` (validated by `Class.Params` when it has one).
    """
    entry = lookup(name)
    return build_strategy(entry, strategy_class(entry), model, params)


def build_strategy(entry: StrategyEntry, cls: type, model: Any, params: dict[str, Any]) -> Any:
    """`cls` (the entry's class) built with checked parameters (see `make_strategy`)."""
    name = entry.name
    values = validate_params(entry, params, raw=name not in BUILTIN and getattr(cls, "Params", None) is None)
    build = getattr(cls, "from_params", None)
    if build is None:
        return cls(**values)
    if model is None:
        raise UsageError(f"strategy {name!r} holds the server's model: make_strategy({name!r}, model, ...)")
    return build(model, **values)


def _load(ref: str) -> type:
    # The one place a strategy reference is imported (user code: measured with the job under Gramine).
    module_name, _, qualname = ref.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"strategy {ref}: cannot import it ({type(exc).__name__}: {exc})") from exc
    if not isinstance(target, type):
        raise ConfigError(f"strategy {ref}: {qualname} is not a class")
    return target
