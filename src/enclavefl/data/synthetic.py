"""Synthetic vertical wide&deep data in the layout of Fedlearner's example/wide_n_deep/make_data.py.

Each party holds `fields_per_party` categorical fields (values 0..vocab_size-1) for the
same example ids; only the leader holds labels. Fedlearner draws its labels at random,
so nothing can be learnt from them; by default the labels here follow a hidden logistic
model over a few fields of EVERY party, so that training converges and the followers'
features matter (`random_labels=True` reproduces the reference). With 512 fields of
which 8 carry signal, a model needs far more rows than the reference's 2,000 to find
them; accuracy demos use fewer fields (16 fields, 10,000 rows: held-out AUC ~0.85).

Files: one compressed .npz per party (`leader.npz`, `follower_0.npz`, ...) holding `ids`
(str [N]), `x` ([N, fields], stored in the smallest unsigned type), `vocab_size`, `role`
and, for the leader only, `y` ([N]). `load_wide_deep_party` reads them back as int64;
the files hold no pickles.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enclavefl.errors import FormatError, UsageError
from enclavefl.fsutil import atomic_writer


@dataclass(frozen=True)
class WideDeepParty:
    """One party's rows: ids str [N], categorical x int64 [N, fields], y int64 [N] or None."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray | None
    vocab_size: int
    role: str

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class WideDeepFiles:
    leader: Path
    followers: tuple[Path, ...]


def make_wide_deep_data(
    out_dir: str | Path,
    rows: int = 2000,
    *,
    fields_per_party: int = 512,
    vocab_size: int = 101,
    num_followers: int = 1,
    informative_fields: int = 8,
    follower_overlap: float = 1.0,
    random_labels: bool = False,
    seed: int = 0,
) -> WideDeepFiles:
    """Write leader and follower files under `out_dir`; returns their paths.

    With `follower_overlap` < 1 each follower holds only that fraction of the leader's
    ids, completed to `rows` rows by ids of its own, in shuffled order (to exercise
    sample alignment).
    """
    if rows < 1 or fields_per_party < 1 or vocab_size < 2 or num_followers < 1:
        raise UsageError(
            f"need rows >= 1, fields_per_party >= 1, vocab_size >= 2, num_followers >= 1; got "
            f"{rows}, {fields_per_party}, {vocab_size}, {num_followers}"
        )
    if not 0.0 < follower_overlap <= 1.0:
        raise UsageError(f"follower_overlap must be in (0, 1], got {follower_overlap}")
    rng = np.random.default_rng(seed)
    features = [
        rng.integers(0, vocab_size, size=(rows, fields_per_party), dtype=np.int64)
        for _ in range(1 + num_followers)
    ]
    informative = min(informative_fields, fields_per_party)
    if random_labels:
        y = rng.integers(0, 2, size=rows, dtype=np.int64)
    else:
        y = _labels(rng, features, informative, vocab_size)
    ids = np.asarray([str(i) for i in range(rows)], dtype=str)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    leader = out / "leader.npz"
    _write_party(leader, ids, features[0], vocab_size, "leader", y=y)
    followers = []
    for k, x in enumerate(features[1:]):
        f_ids, f_x = ids, x
        if follower_overlap < 1.0:
            f_ids, f_x = _partly_overlapping(rng, ids, x, follower_overlap, vocab_size, prefix=f"f{k}-")
        path = out / f"follower_{k}.npz"
        _write_party(path, f_ids, f_x, vocab_size, "follower")
        followers.append(path)
    return WideDeepFiles(leader, tuple(followers))


def _labels(rng: np.random.Generator, features: list[np.ndarray], informative: int, vocab_size: int) -> np.ndarray:
    """Labels from a hidden logistic model over the first `informative` fields of every party."""
    rows = features[0].shape[0]
    score = np.zeros(rows)
    for x in features:
        weights = rng.normal(size=(informative, vocab_size))
        score += weights[np.arange(informative), x[:, :informative]].sum(axis=1)
    # Scaled so the label is mostly, not fully, determined by the features.
    score *= 3.0 / np.sqrt(informative * len(features))
    return (rng.random(rows) < 1.0 / (1.0 + np.exp(-score))).astype(np.int64)


def _partly_overlapping(
    rng: np.random.Generator, ids: np.ndarray, x: np.ndarray, overlap: float, vocab_size: int, *, prefix: str
) -> tuple[np.ndarray, np.ndarray]:
    """A follower's rows: `overlap` of the leader's, completed by rows of its own (ids
    `prefix`0, `prefix`1, ...), shuffled."""
    rows, fields = x.shape
    kept = rng.choice(rows, size=max(1, int(round(rows * overlap))), replace=False)
    extra = rows - len(kept)
    extra_ids = np.asarray([f"{prefix}{i}" for i in range(extra)], dtype=str)
    extra_x = rng.integers(0, vocab_size, size=(extra, fields), dtype=np.int64)
    order = rng.permutation(rows)
    return np.concatenate([ids[kept], extra_ids])[order], np.concatenate([x[kept], extra_x])[order]


def _write_party(
    path: Path, ids: np.ndarray, x: np.ndarray, vocab_size: int, role: str, *, y: np.ndarray | None = None
) -> None:
    """One party's .npz, written atomically: both parties of a job may generate the
    (identical) files at the same moment."""
    arrays: dict[str, Any] = {"ids": ids, "x": _compact(x, vocab_size)}
    if y is not None:
        arrays["y"] = y.astype(np.uint8)
    with atomic_writer(path) as handle:
        np.savez_compressed(handle, **arrays, vocab_size=vocab_size, role=role)


def _compact(x: np.ndarray, vocab_size: int) -> np.ndarray:
    # The smallest unsigned type: 8x less to compress than int64, hence much faster.
    return x.astype(np.min_scalar_type(vocab_size - 1))


def load_wide_deep_party(path: str | Path) -> WideDeepParty:
    """Read one party's file written by `make_wide_deep_data`, checking its shapes and ranges."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise UsageError(f"wide&deep data file {path} not found") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path} is not a wide&deep .npz file: {exc}") from None
    missing = {"ids", "x", "vocab_size", "role"} - arrays.keys()
    if missing:
        raise FormatError(f"{path}: missing arrays {sorted(missing)}")
    ids, x = arrays["ids"], arrays["x"]
    vocab_size, role = int(arrays["vocab_size"]), str(arrays["role"])
    if ids.ndim != 1 or x.ndim != 2 or x.shape[0] != ids.shape[0] or x.dtype.kind not in "iu":
        raise FormatError(
            f"{path}: need ids [N] and integer x [N, F], got {list(ids.shape)} and {x.dtype} {list(x.shape)}"
        )
    if x.size and (x.min() < 0 or x.max() >= vocab_size):
        raise FormatError(f"{path}: feature values must be in [0, {vocab_size}), got {x.min()}..{x.max()}")
    y = arrays.get("y")
    if y is not None and (y.shape != ids.shape or not np.isin(y, (0, 1)).all()):
        raise FormatError(f"{path}: labels must be 0/1 of shape {list(ids.shape)}")
    if (role == "leader") != (y is not None):
        raise FormatError(f"{path}: role {role!r} but labels {'present' if y is not None else 'absent'}")
    return WideDeepParty(
        ids.astype(str), x.astype(np.int64), None if y is None else y.astype(np.int64), vocab_size, role
    )
