"""Vertical split MLP: a bottom MLP per party, a top MLP on the leader over their outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from enclavefl.models.mlp import mlp


class BottomMLP(nn.Module):
    """A party's bottom model: its feature columns [N, in_features] -> ReLU activations [N, out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int = 16,
        hidden: Sequence[int] = (32,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = mlp(in_features, hidden, out_features, dropout)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net(x))


class TopMLP(nn.Module):
    """Leader's top model over the concatenated bottom activations -> logits [N, out_features].

    `in_features` is the sum of every bottom's width, the leader's own bottom included.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (32,),
        out_features: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = mlp(in_features, hidden, out_features, dropout)

    def forward(self, activations: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat(list(activations), dim=1))
