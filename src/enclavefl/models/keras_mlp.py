"""Keras twins of the built-in MLPs (extra `[tf]`): same layers, same initialisation.

`keras_mlp`, `keras_bottom_mlp` and `keras_top_mlp` build the networks of `mlp`,
`BottomMLP` and `TopMLP` with torch's `nn.Linear` initialisation (weights and biases
uniform in +-1/sqrt(fan_in)), so that a Keras job and a torch job with the same job file
train the same model. Layers are named ("hidden_0", ..., "logits"), which makes the
weight names stable. Keras is imported when a model is built, never at import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from enclavefl.errors import UsageError
from enclavefl.extras import import_from_extra

__all__ = ["KERAS_BUILTINS", "keras_bottom_mlp", "keras_mlp", "keras_top_mlp"]


def _keras() -> Any:
    return import_from_extra("keras", "tf", needed_for="Keras models")


def _widths(in_features: int, hidden: Sequence[int], out_features: int, dropout: float) -> list[int]:
    widths = [int(in_features), *(int(h) for h in hidden), int(out_features)]
    if min(widths) < 1:
        raise UsageError(f"MLP layer widths must be >= 1, got {widths}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}")
    return widths


def _dense(keras: Any, fan_in: int, units: int, name: str, activation: str | None = None) -> Any:
    # torch.nn.Linear: kaiming_uniform(a=sqrt(5)) for the kernel = U(+-1/sqrt(fan_in)), same bound for the bias.
    bound = 1.0 / math.sqrt(fan_in)
    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=keras.initializers.RandomUniform(-bound, bound),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
        name=name,
    )


def _stack(keras: Any, x: Any, widths: list[int], dropout: float, last: str) -> Any:
    for i, (fan_in, units) in enumerate(zip(widths[:-2], widths[1:-1], strict=True)):
        x = _dense(keras, fan_in, units, f"hidden_{i}", "relu")(x)
        if dropout > 0.0:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    return _dense(keras, widths[-2], widths[-1], last)(x)


def keras_mlp(
    in_features: int, hidden: Sequence[int] = (64, 32), out_features: int = 1, dropout: float = 0.0
) -> Any:
    """Dense-ReLU(-Dropout) layers, then `out_features` logits: the Keras `mlp`."""
    keras = _keras()
    widths = _widths(in_features, hidden, out_features, dropout)
    inputs = keras.Input((widths[0],), name="features")
    return keras.Model(inputs, _stack(keras, inputs, widths, dropout, "logits"), name="mlp")


def keras_bottom_mlp(
    in_features: int, out_features: int = 16, hidden: Sequence[int] = (32,), dropout: float = 0.0
) -> Any:
    """A party's bottom model: its columns [n, in_features] -> ReLU activations [n, out_features]."""
    keras = _keras()
    widths = _widths(in_features, hidden, out_features, dropout)
    inputs = keras.Input((widths[0],), name="features")
    outputs = keras.layers.ReLU(name="activations")(_stack(keras, inputs, widths, dropout, "out"))
    return keras.Model(inputs, outputs, name="bottom_mlp")


def keras_top_mlp(
    in_features: int, hidden: Sequence[int] = (32,), out_features: int = 1, dropout: float = 0.0
) -> Any:
    """The leader's top model over the bottoms' activations, concatenated [n, in_features] -> logits.

    `KerasHalf` concatenates the activations it is given, as `TopMLP` does.
    """
    keras = _keras()
    widths = _widths(in_features, hidden, out_features, dropout)
    inputs = keras.Input((widths[0],), name="activations")
    return keras.Model(inputs, _stack(keras, inputs, widths, dropout, "logits"), name="top_mlp")


KERAS_BUILTINS: dict[str, Callable[..., Any]] = {
    "mlp": keras_mlp,
    "bottom_mlp": keras_bottom_mlp,
    "top_mlp": keras_top_mlp,
}
