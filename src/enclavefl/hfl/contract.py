"""The strategy contract: what the parameter server asks of a strategy, built-in or a user's.

A strategy is any object with these hooks (no base class needed); the parameter server
owns the global model and calls them, serialized, from its own lock:

```
name: str                                        shown in logs, summaries and checkpoints
configure_round(round, state) -> config          sent to the workers with the state of `round`
aggregate(round, contributions) -> (new_state, metrics)
state_dict() -> dict; load_state_dict(dict)      checkpoints; refuse what does not match
```

and optionally:

* `kind`: `"update"` (default: workers train a round and send their new weights, seen
  here as `update = new - global`) or `"grad"` (workers send the gradients of one batch).
* `asynchronous = True` (with kind "grad"): `aggregate` is called for each contribution
  as it arrives, instead of once per round; metrics `{"accepted": 0.0}` refuse it.
* `evaluate(round, state) -> metrics | None`: evaluation of the global state on the
  server (used when the job gives the server no evaluation data of its own).
* `aggregate_mean(round, mean)`: for strategies whose result depends only on the
  num_examples-weighted mean of the contributions (FedAvg, FedAdam, sync-sgd); the server
  then adds contributions into one running sum as they arrive instead of holding every
  worker's, and calls this with the mean as one internal contribution.
* `stop_reason() -> str | None`: asked after each version is published (evaluated and
  sealed) while versions remain; a reason (e.g. `"privacy budget"`, when one more round
  would spend more than it) ends the run there: that state is final and `stopped` in the
  summary says why.

`round` is 1-based: the round (or step) being configured or closed. `state` maps every
parameter and persistent buffer of the global model to a numpy array (read-only; it is
the state the round starts from). `aggregate` returns the new values of the names it
changes (others keep theirs) and metrics (name -> float) recorded with the round.
`state_dict()` holds the strategy's own state (e.g. server optimizer moments) and its
hyper-parameters; `load_state_dict` must raise `enclavefl.errors.ConfigError` for a
checkpoint of other hyper-parameters. The server checkpoints the model itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from enclavefl.errors import UsageError

__all__ = ["HOOKS", "Contribution", "Strategy", "check_strategy"]

HOOKS = ("configure_round", "aggregate", "state_dict", "load_state_dict")


@dataclass(frozen=True)
class Contribution:
    """One worker's contribution to a round (or step), as numpy.

    `update`: for kind "update", new - global for every trainable parameter and buffer
    (embedding tables dense: rows the worker did not touch are zero); for kind "grad",
    the mean-loss gradients of one batch (and buffer deltas). `version` is the global
    version the worker computed at (for asynchronous strategies, the staleness is the
    current version minus it).
    """

    worker: str
    num_examples: int
    update: Mapping[str, np.ndarray]
    version: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Strategy(Protocol):
    """The hooks every strategy has (see the module docstring for the optional ones)."""

    name: str

    def configure_round(self, round: int, state: Mapping[str, np.ndarray]) -> Mapping[str, Any]: ...

    def aggregate(
        self, round: int, contributions: Sequence[Contribution]
    ) -> tuple[Mapping[str, np.ndarray], Mapping[str, float]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def check_strategy(strategy: object) -> None:
    """UsageError naming what `strategy` lacks to be used by the parameter server."""
    missing = [hook for hook in HOOKS if not callable(getattr(strategy, hook, None))]
    if missing:
        raise UsageError(
            f"{type(strategy).__name__} is not a strategy: it lacks {missing} "
            "(see enclavefl.hfl.contract for the hooks a strategy needs)"
        )
    name = getattr(strategy, "name", None)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{type(strategy).__name__} is not a strategy: it needs a `name` string")
    kind = getattr(strategy, "kind", "update")
    if kind not in ("update", "grad"):
        raise UsageError(f"strategy {name}: kind must be 'update' or 'grad', got {kind!r}")
    if getattr(strategy, "asynchronous", False) and kind != "grad":
        raise UsageError(f"strategy {name}: asynchronous strategies must be of kind 'grad'")
