"""Feature preprocessing that travels with a model: standardization.

`Standardize` holds one party's feature means and standard deviations as buffers, so they
are part of the model's state: sealed with its checkpoints and its exported half, and
reused as they are by `predict`. They are fitted on that party's own training rows and
never leave the party (only activations computed from the scaled features do).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Standardize", "fit_standardizers"]

# A column with (almost) no spread is centred but not scaled up.
_MIN_STD = 1e-6


class Standardize(nn.Module):
    """(x - mean) / std per feature column; mean 0, std 1 until `fit`."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def fit(self, x: torch.Tensor) -> None:
        """Statistics of `x` [rows, num_features] (the party's training rows)."""
        x = x.to(self.mean.dtype)  # type: ignore[arg-type]
        self.mean.copy_(x.mean(dim=0))  # type: ignore[operator]
        std = x.std(dim=0, unbiased=False)
        self.std.copy_(torch.where(std < _MIN_STD, torch.ones_like(std), std))  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # type: ignore[operator]


def fit_standardizers(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fit every Standardize in `model` on `x`; returns their new state entries (name -> tensor)."""
    updated: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, Standardize):
            module.fit(x)
            prefix = f"{name}." if name else ""
            updated[f"{prefix}mean"] = module.mean.detach().clone()  # type: ignore[operator]
            updated[f"{prefix}std"] = module.std.detach().clone()  # type: ignore[operator]
    return updated
