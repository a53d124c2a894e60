"""Label differential privacy by randomized response (Ghazi et al., "Deep Learning with
Label Differential Privacy", NeurIPS 2021, the RR baseline).

Each training label is kept with probability e^eps / (e^eps + K - 1) and otherwise replaced
by one of the K - 1 other classes uniformly at random. Drawn once, before training, and
reused in every epoch: whatever the model, its gradients and the activations' gradients
the leader sends followers are computed from the randomized labels only, so the labels of
the training rows are epsilon-label-DP (delta = 0) by post-processing, for any number of
epochs. Redrawing them each epoch would compose and spend epsilon per epoch.
"""

from __future__ import annotations

import math

import numpy as np

from enclavefl.errors import UsageError

__all__ = ["keep_probability", "randomized_response"]


def keep_probability(epsilon: float, num_classes: int) -> float:
    """The probability that randomized response keeps a label."""
    if not (epsilon > 0):
        raise UsageError(f"label epsilon must be > 0, got {epsilon}")
    if num_classes < 2:
        raise UsageError(f"randomized response needs at least 2 classes, got {num_classes}")
    if math.isinf(epsilon):
        return 1.0
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def randomized_response(
    labels: np.ndarray, epsilon: float, *, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """`labels` (integers in 0..num_classes-1, or 0/1 floats) after randomized response."""
    values = np.asarray(labels)
    as_int = values.astype(np.int64)
    if not np.array_equal(as_int, values) or as_int.min(initial=0) < 0 or as_int.max(initial=0) >= num_classes:
        raise UsageError(f"randomized response needs class labels in 0..{num_classes - 1}")
    keep = rng.random(as_int.shape) < keep_probability(epsilon, num_classes)
    # A uniformly random *other* class: shift by 1..K-1 modulo K.
    shifted = (as_int + rng.integers(1, num_classes, size=as_int.shape)) % num_classes
    return np.where(keep, as_int, shifted).astype(values.dtype)
