"""The split model of this job, in Keras 3: edit it freely.

The job file names each half as `module:function` with `framework: keras`. Each party runs
`build_bottom` over its own columns and the follower sends only the activations to the
leader; the leader's `build_top` reads both parties' activations (concatenated: the
leader's first), computes the loss against its labels and sends back only the
activations' gradients. The top model returns one logit per row for the binary label y.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras


def build_bottom(in_features: int, out_features: int = 8, hidden: Sequence[int] = (16,)) -> keras.Model:
    """A party's model: its columns [N, in_features] -> activations [N, out_features]."""
    inputs = keras.Input(shape=(in_features,))
    x = inputs
    for size in hidden:
        x = keras.layers.Dense(size, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(out_features, activation="relu")(x))


def build_top(in_features: int, hidden: Sequence[int] = (16,)) -> keras.Model:
    """The leader's model: the parties' activations [N, in_features] -> logits [N, 1]."""
    inputs = keras.Input(shape=(in_features,))
    x = inputs
    for size in hidden:
        x = keras.layers.Dense(size, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(1)(x))
