"""The Gaussian mechanism's two halves: clipping to a norm, and calibrated noise.

Used by central (worker-level) DP at the parameter server: each worker's update, all its
tensors taken together as one vector, is scaled to L2 norm at most C; the server adds
N(0, (sigma*C)^2) to every coordinate of the sum, inside its enclave.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from enclavefl.errors import UsageError

__all__ = ["add_gaussian_noise", "clip_to_norm", "global_norm"]


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors concatenated into one vector."""
    total = 0.0
    for tensor in tensors.values():
        total += float(torch.sum(tensor.detach().double() ** 2))
    return math.sqrt(total)


def clip_to_norm(tensors: Mapping[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """`tensors` scaled by min(1, max_norm / norm), and their norm before clipping."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise UsageError(f"clipping norm must be a finite number > 0, got {max_norm}")
    norm = global_norm(tensors)
    if not math.isfinite(norm):
        raise UsageError("an update holds NaN or infinite values; it cannot be clipped")
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {name: tensor * scale for name, tensor in tensors.items()}, norm


def add_gaussian_noise(
    tensors: Mapping[str, torch.Tensor], std: float, *, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """`tensors` + independent N(0, std^2) noise on every floating-point coordinate."""
    if not (math.isfinite(std) and std >= 0):
        raise UsageError(f"noise standard deviation must be a finite number >= 0, got {std}")
    noised = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise UsageError(f"cannot add Gaussian noise to {name!r} of dtype {tensor.dtype}")
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64, device=tensor.device)
        noised[name] = (tensor.double() + std * noise).to(tensor.dtype)
    return noised
