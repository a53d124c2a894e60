"""The split model of this job: edit it freely.

The job file names both halves as `module:function`. The follower runs `build_bottom` over
its own columns and sends only the activations to the leader; the leader runs `build_top`
over its own columns and those activations, computes the loss against its labels and sends
back only the activations' gradients. The top model's forward takes (own columns, list of
follower activations) and returns one logit per row for the binary label y.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _mlp(in_features: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers)


def build_bottom(in_features: int, out_features: int = 8, hidden: Sequence[int] = (16,)) -> nn.Module:
    """The follower's model: its columns [N, in_features] -> activations [N, out_features]."""
    return nn.Sequential(_mlp(in_features, hidden), nn.Linear(hidden[-1], out_features), nn.ReLU())


class Top(nn.Module):
    """The leader's model: its own columns and the followers' activations -> logits [N, 1]."""

    def __init__(self, in_features: int, follower_width: int, hidden: Sequence[int] = (16,)) -> None:
        super().__init__()
        self.own = _mlp(in_features, hidden)
        self.head = nn.Linear(hidden[-1] + follower_width, 1)

    def forward(self, x: torch.Tensor, follower_activations: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([self.own(x), *follower_activations], dim=1))


def build_top(in_features: int, follower_width: int = 8, hidden: Sequence[int] = (16,)) -> nn.Module:
    return Top(in_features, follower_width, hidden)
