"""Numpy arrays to a torch Dataset (for DataLoader), and seeded mini-batch index order."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import TensorDataset

from enclavefl.errors import UsageError


def tensor_dataset(*arrays: np.ndarray | torch.Tensor) -> TensorDataset:
    """A TensorDataset over arrays of the same length (numpy memory is shared, not copied)."""
    tensors = [torch.as_tensor(a) for a in arrays]
    lengths = {int(t.shape[0]) for t in tensors}
    if len(lengths) > 1:
        raise UsageError(f"arrays must have the same number of rows, got {sorted(lengths)}")
    return TensorDataset(*tensors)


def batch_indices(
    num_rows: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> Iterator[np.ndarray]:
    """Row indices of each mini-batch of one epoch; the same seed gives the same order."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng(seed).permutation(num_rows) if shuffle else np.arange(num_rows)
    stop = num_rows - num_rows % batch_size if drop_last else num_rows
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
