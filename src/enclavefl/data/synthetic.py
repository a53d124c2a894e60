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
    informative = min(informative_fields, fields_per_party)
    rng = np.random.default_rng(seed)
    features = [
        rng.integers(0, vocab_size, size=(rows, fields_per_party), dtype=np.int64)
        for _ in range(1 + num_followers)
    ]
    if random_labels:
        y = rng.integers(0, 2, size=rows, dtype=np.int64)
    else:
        score = np.zeros(rows)
        for x in features:
            weights = rng.normal(size=(informative, vocab_size))
            score += weights[np.arange(informative), x[:, :informative]].sum(axis=1)
        # Scaled so the label is mostly, not fully, determined by the features.
        score *= 3.0 / np.sqrt(informative * len(features))
        y = (rng.random(rows) < 1.0 / (1.0 + np.exp(-score))).astype(np.int64)
    ids = np.asarray([str(i) for i in range(rows)], dtype=str)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    leader = out / "leader.npz"
    # Atomic: both parties of a job may generate the (identical) files at the same moment.
    with atomic_writer(leader) as handle:
        np.savez_compressed(
            handle,
            ids=ids,
            x=_compact(features[0], vocab_size),
            y=y.astype(np.uint8),
            vocab_size=vocab_size,
            role="leader",
        )
    followers = []
    for k, x in enumerate(features[1:]):
        f_ids, f_x = ids, x
        if follower_overlap < 1.0:
            kept = rng.choice(rows, size=max(1, int(round(rows * follower_overlap))), replace=False)
            extra = rows - len(kept)
            extra_ids = np.asarray([f"f{k}-{i}" for i in range(extra)], dtype=str)
            extra_x = rng.integers(0, vocab_size, size=(extra, fields_per_party), dtype=np.int64)
            order = rng.permutation(rows)
            f_ids = np.concatenate([ids[kept], extra_ids])[order]
            f_x = np.concatenate([x[kept], extra_x])[order]
        path = out / f"follower_{k}.npz"
        with atomic_writer(path) as handle:
            np.savez_compressed(
                handle, ids=f_ids, x=_compact(f_x, vocab_size), vocab_size=vocab_size, role="follower"
            )
        followers.append(path)
    return WideDeepFiles(leader, tuple(followers))


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
