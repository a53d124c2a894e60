"""Multi-layer perceptron for tabular data."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from enclavefl.errors import UsageError


def mlp(
    in_features: int,
    hidden: Sequence[int] = (64, 32),
    out_features: int = 1,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Linear-ReLU(-Dropout) layers, then a linear output of `out_features` logits.

    Binary classification: out_features=1 (one logit, use BCEWithLogitsLoss on
    `out.squeeze(-1)`); K classes: out_features=K (CrossEntropyLoss).
    """
    widths = [int(in_features), *(int(h) for h in hidden), int(out_features)]
    if min(widths) < 1:
        raise UsageError(f"MLP layer widths must be >= 1, got {widths}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-2], widths[1:-1], strict=True):
        layers.append(nn.Linear(width_in, width_out))
        layers.append(nn.ReLU())
        if dropout > 0.0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)
