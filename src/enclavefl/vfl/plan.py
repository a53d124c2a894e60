"""The iteration plan: which aligned rows each iteration uses, derived from a few shared numbers.

Leader and followers hold the same aligned order (positions 0..rows-1), so the plan's
numbers (seed, batch size, validation fraction, ...) are all they need to agree on every
batch without sending ids. The leader decides the plan and sends it when a follower joins.
That order is canonical (the intersection sorted by a hash of the id,
`enclavefl.vfl.align.canonical_order`), so the validation rows and the batches depend on
the seed and the ids only: the same in every run, and `validation_split` computes them
from the ids alone.

A training plan has, per epoch, `batches_per_epoch` training iterations and then one
evaluation iteration over the validation rows; a prediction plan has one iteration per
batch of the input. Iteration ids run 0..total-1 over the whole job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, Literal

import numpy as np

from enclavefl.errors import FormatError, UsageError
from enclavefl.validate import is_int
from enclavefl.vfl.align import AlignmentResult, Ids, canonical_order

__all__ = ["EVAL", "PREDICT", "TRAIN", "Mode", "Plan", "Step", "validation_split"]

Mode = Literal["train", "predict"]
TRAIN: Final = "train"
EVAL: Final = "eval"
PREDICT: Final = "predict"

# Independent streams of the job seed: the validation split and each epoch's batch order.
_SPLIT_STREAM = 0x76616C
_EPOCH_STREAM = 0x65706F


@dataclass(frozen=True)
class Step:
    """One iteration: its kind, its epoch and the aligned positions it covers."""

    iteration: int
    kind: str
    epoch: int
    positions: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Plan:
    """Every party derives the same steps from these numbers.

    `checkpoint_every` (0: never) makes iterations k with (k + 1) % every == 0, and the
    last one, synchronized checkpoints: nothing after k is opened before every party
    committed k. `keep_best`: every party ends with (and exports) the weights of the best
    evaluation instead of the last; the leader judges each evaluation and tells the followers.
    """

    mode: Mode
    rows: int
    batch_size: int
    epochs: int = 1
    seed: int = 0
    validation_fraction: float = 0.2
    pipeline_depth: int = 1
    checkpoint_every: int = 0
    keep_best: bool = False

    def __post_init__(self) -> None:
        if self.mode not in (TRAIN, PREDICT):
            raise UsageError(f"plan mode must be 'train' or 'predict', got {self.mode!r}")
        for name in ("rows", "batch_size", "epochs", "pipeline_depth"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise UsageError(f"plan {name} must be an integer >= 1, got {value!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise UsageError(f"plan seed must be an integer >= 0, got {self.seed!r}")
        every = self.checkpoint_every
        if not is_int(every) or every < 0:
            raise UsageError(f"plan checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if not isinstance(self.keep_best, bool):
            raise UsageError(f"plan keep_best must be true or false, got {self.keep_best!r}")
        if self.keep_best and self.mode != TRAIN:
            raise UsageError("plan keep_best applies to training only")
        if self.mode == TRAIN:
            if not 0.0 < self.validation_fraction < 1.0:
                raise UsageError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
            validation = self.validation_rows
            if validation < 1 or validation >= self.rows:
                raise UsageError(
                    f"validation_fraction {self.validation_fraction} of {self.rows} aligned rows leaves "
                    f"{validation} validation and {self.rows - validation} training rows; both need at least one"
                )

    # --- the split ------------------------------------------------------------------------

    @property
    def validation_rows(self) -> int:
        return int(round(self.rows * self.validation_fraction)) if self.mode == TRAIN else 0

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """(training positions, validation positions), each ascending; empty validation when predicting."""
        return _split(self.rows, self.validation_rows, self.seed)

    # --- iterations -------------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil((self.rows - self.validation_rows) / self.batch_size)

    @property
    def total(self) -> int:
        if self.mode == PREDICT:
            return self.batches_per_epoch
        return self.epochs * (self.batches_per_epoch + 1)

    def step(self, iteration: int) -> Step:
        if not 0 <= iteration < self.total:
            raise UsageError(f"iteration {iteration} is outside the plan's 0..{self.total - 1}")
        if self.mode == PREDICT:
            start = iteration * self.batch_size
            return Step(iteration, PREDICT, 0, np.arange(start, min(start + self.batch_size, self.rows)))
        epoch, index = divmod(iteration, self.batches_per_epoch + 1)
        train, validation = self.split()
        if index == self.batches_per_epoch:
            return Step(iteration, EVAL, epoch, validation)
        order = _epoch_order(train.size, self.seed, epoch)
        start = index * self.batch_size
        return Step(iteration, TRAIN, epoch, train[order[start : start + self.batch_size]])

    def kind(self, iteration: int) -> str:
        if self.mode == PREDICT:
            return PREDICT
        return EVAL if iteration % (self.batches_per_epoch + 1) == self.batches_per_epoch else TRAIN

    def is_checkpoint(self, iteration: int) -> bool:
        every = self.checkpoint_every
        return every > 0 and ((iteration + 1) % every == 0 or iteration == self.total - 1)

    def required(self, iteration: int) -> int:
        """The iteration every party must have committed before `iteration` is opened.

        At most `pipeline_depth` iterations are in flight, except across barriers: an
        evaluation sees every earlier update and nothing later, and checkpoints are taken
        with nothing in flight.
        """
        if iteration <= 0:
            return -1
        previous = iteration - 1
        if self.kind(iteration) == EVAL or self.kind(previous) == EVAL or self.is_checkpoint(previous):
            return previous
        return max(-1, iteration - self.pipeline_depth)

    # --- on the wire and in checkpoints -----------------------------------------------------

    def to_meta(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rows": self.rows,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "seed": self.seed,
            "validation_fraction": self.validation_fraction,
            "pipeline_depth": self.pipeline_depth,
            "checkpoint_every": self.checkpoint_every,
            "keep_best": self.keep_best,
        }

    @classmethod
    def from_meta(cls, meta: Any) -> Plan:
        if isinstance(meta, dict) and "keep_best" not in meta:
            meta = {**meta, "keep_best": False}  # a plan written before keep_best existed
        if not isinstance(meta, dict) or set(meta) != set(_META_TYPES):
            got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise FormatError(f"plan: expected fields {sorted(_META_TYPES)}, got {got}")
        for name, kind in _META_TYPES.items():
            value = meta[name]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
                raise FormatError(f"plan field {name!r}: expected {kind}, got {value!r}")
        try:
            return cls(**meta)
        except UsageError as exc:
            raise FormatError(f"plan: {exc.reason}") from None

    def differences(self, other: Plan) -> list[str]:
        """'field: ours vs theirs' for each field that differs."""
        mine, theirs = self.to_meta(), other.to_meta()
        return [f"{name}: {mine[name]!r} vs {theirs[name]!r}" for name in mine if mine[name] != theirs[name]]


_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "mode": str,
    "rows": int,
    "batch_size": int,
    "epochs": int,
    "seed": int,
    "validation_fraction": (int, float),
    "pipeline_depth": int,
    "checkpoint_every": int,
    "keep_best": bool,
}


def validation_split(ids: Ids, *, validation_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, validation ids) that a vfl job with `seed` and `validation_fraction`
    uses when the parties' intersection is `ids` (in any order): the same split as the
    leader's `--write-split`, computed from the ids alone (e.g. for a centralized baseline)."""
    rows = canonical_order(AlignmentResult(np.arange(len(ids))), ids).rows
    plan = Plan(TRAIN, len(rows), 1, seed=seed, validation_fraction=validation_fraction)
    train, validation = plan.split()
    values = np.asarray(ids)
    return values[rows[train]], values[rows[validation]]


@lru_cache(maxsize=4)
def _split(rows: int, validation: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng((seed, _SPLIT_STREAM)).permutation(rows)
    val, train = np.sort(order[:validation]), np.sort(order[validation:])
    val.setflags(write=False)
    train.setflags(write=False)
    return train, val


@lru_cache(maxsize=4)
def _epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng((seed, _EPOCH_STREAM, epoch)).permutation(rows)
    order.setflags(write=False)
    return order
