"""The model every party of this job trains: edit it freely.

The job file names it as `model: {name: model:build_model, args: {...}}`; every party calls
build_model(**args) with the same seed, so all start from the same weights. Keep the output
a single logit for the binary label y (the loss is BCE-with-logits), or set
`out_features: <classes>` for a multi-class label.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def build_model(in_features: int, hidden: Sequence[int] = (32, 16), out_features: int = 1) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
