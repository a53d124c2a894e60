"""Keras 3 models under the fit/evaluate contract (extra `[tf]`).

`KerasTrainer` is to Keras what `TorchTrainer` is to PyTorch: weights cross the
contract as numpy arrays named by layer-variable path, local training is `model.fit`
(or the user's `train_one_round`), per-step gradients come from `tf.GradientTape`
(or torch autograd when `KERAS_BACKEND=torch`), and evaluation goes through the same
metric definitions as the torch path (`enclavefl.train.metrics`), computed from numpy
logits so that an AUC from a Keras run and one from a torch run are comparable.

Names are stable: a variable's path ("dense/kernel", "logits/bias"), with the outer
model's name dropped and Keras' automatic layer names ("dense_7") renumbered in the
order they appear in the model ("dense", "dense_1"), which is what a fresh process
gives. Two builds of the same model, in one process or two, have the same names, and
weights are matched by name, never by position: a model whose variables differ from the
weights it is given is refused, naming the variables that differ.

Importing this module needs Keras (`pip install 'enclavefl[tf]'`); nothing in the core
imports it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from enclavefl.errors import UsageError
from enclavefl.extras import import_from_extra
from enclavefl.train.contract import Config, EvalResult, FitResult, GradResult, Weights
from enclavefl.train.metrics import eval_stats
from enclavefl.validate import is_int

keras = import_from_extra("keras", "tf", needed_for="Keras trainers")

__all__ = [
    "KerasTrainer",
    "TorchMirror",
    "check_weights",
    "get_weights",
    "keras_eval_stats",
    "predict_logits",
    "set_weights",
    "value_and_grad",
    "variable_names",
]

ArrayData = tuple[Any, np.ndarray]
_AUTO_SUFFIX = re.compile(r"(.+?)(?:_(\d+))?")


# -- names and weights -------------------------------------------------------------------


def _snake(name: str) -> str:
    return keras.src.utils.naming.to_snake_case(name)


def _canonical_layer_names(model: Any) -> dict[str, str]:
    """Layer name -> stable name: automatic names renumbered in the order the model lists them."""
    seen: dict[str, int] = {}
    renamed: dict[str, str] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        base = _snake(type(layer).__name__)
        match = _AUTO_SUFFIX.fullmatch(layer.name)
        if match is None or match.group(1) != base or layer.name in renamed:
            continue  # a name the user chose: kept as it is
        count = seen.get(base, 0)
        seen[base] = count + 1
        renamed[layer.name] = base if count == 0 else f"{base}_{count}"
    return renamed


def variable_names(model: Any, *, trainable_only: bool = False) -> list[str]:
    """Stable names of the model's weights (trainable, then non-trainable, as Keras orders them)."""
    if not model.built:
        raise UsageError(f"Keras model {model.name!r} is not built: give it an Input or call it once first")
    renamed = _canonical_layer_names(model)
    variables = model.trainable_weights if trainable_only else model.weights
    names = []
    for variable in variables:
        parts = variable.path.split("/")
        if len(parts) > 1 and parts[0] == model.name:
            parts = parts[1:]
        names.append("/".join([*(renamed.get(p, p) for p in parts[:-1]), parts[-1]]))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"Keras model {model.name!r} has several variables named {duplicates}: name its layers")
    return names


def get_weights(model: Any) -> dict[str, np.ndarray]:
    """Fresh numpy copies of every weight, by stable name (one copy each, no more)."""
    return {name: np.asarray(v.numpy()) for name, v in zip(variable_names(model), model.weights, strict=True)}


def check_weights(model: Any, weights: Weights) -> None:
    """Raise UsageError, naming what differs, unless `weights` has exactly the model's names, shapes, dtypes."""
    names = variable_names(model)
    missing = [n for n in names if n not in weights]
    unexpected = sorted(set(weights) - set(names))
    if missing or unexpected:
        differences = []
        if missing:
            differences.append(f"the weights lack {missing}")
        if unexpected:
            differences.append(f"the model has no {unexpected}")
        raise UsageError(
            f"Keras model {model.name!r} does not match the weights it was given: {'; '.join(differences)}"
        )
    wrong = []
    for name, variable in zip(names, model.weights, strict=True):
        value = weights[name]
        shape, dtype = tuple(variable.shape), np.dtype(variable.dtype)
        if tuple(np.shape(value)) != shape or np.asarray(value).dtype != dtype:
            wrong.append(
                f"{name}: model {dtype} {list(shape)}, weights {np.asarray(value).dtype} {list(np.shape(value))}"
            )
    if wrong:
        raise UsageError(f"Keras model {model.name!r} does not match the weights it was given: {'; '.join(wrong)}")


def set_weights(model: Any, weights: Weights) -> None:
    """Assign `weights` by name; everything is checked before anything is written."""
    check_weights(model, weights)
    for name, variable in zip(variable_names(model), model.weights, strict=True):
        variable.assign(weights[name])


class TorchMirror(torch.nn.Module):
    """A torch module that holds a copy of a Keras model's weights under their stable names:
    trainable variables as parameters, the others (BatchNorm statistics) as buffers.

    The parameter server keeps and aggregates the global state as torch tensors; with this
    mirror it does so for a Keras job, and its names and shapes are exactly the weights a
    KerasTrainer exchanges (Keras' kernel layout: [in, out]). It has no forward: evaluate
    with `load_into` and the Keras model.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        trainable = set(variable_names(model, trainable_only=True))
        for name, value in get_weights(model).items():
            tensor = torch.from_numpy(value)
            if name in trainable:
                self.register_parameter(name, torch.nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def weights(self) -> dict[str, np.ndarray]:
        return {name: t.detach().cpu().numpy() for name, t in self.state_dict().items()}

    def load_into(self, model: Any) -> None:
        """Assign the mirrored weights to the Keras model (checked by name first)."""
        set_weights(model, self.weights())


# -- gradients -----------------------------------------------------------------------------


def value_and_grad(
    model: Any, loss: Callable[[Any, Any], Any], x: Any, y: Any, *, penalty: Callable[[], Any] | None = None
) -> tuple[float, list[Any]]:
    """(loss, gradients of the trainable variables) of one batch in training mode.

    tf.GradientTape under the TensorFlow backend, torch autograd under the torch backend;
    `penalty()` (e.g. FedProx's proximal term) is added to the loss inside the recording.
    """
    backend = keras.backend.backend()
    trainable = model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            total = _total_loss(model, loss, x, y, penalty)
        grads = tape.gradient(total, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return float(total), list(grads)
    if backend == "torch":
        total = _total_loss(model, loss, x, y, penalty)
        grads = torch.autograd.grad(total, [v.value for v in trainable], allow_unused=True)
        return float(total.detach()), [
            g if g is not None else torch.zeros_like(v.value) for g, v in zip(grads, trainable, strict=True)
        ]
    raise UsageError(f"per-step gradients support KERAS_BACKEND tensorflow or torch, not {backend!r}")


def _total_loss(model: Any, loss: Callable[[Any, Any], Any], x: Any, y: Any, penalty: Callable[[], Any] | None) -> Any:
    total = loss(keras.ops.convert_to_tensor(y), model(_tensor(x), training=True))
    if model.losses:
        total = total + keras.ops.sum(keras.ops.stack(model.losses))
    if penalty is not None:
        total = total + penalty()
    return total


def _tensor(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [keras.ops.convert_to_tensor(part) for part in x]
    if isinstance(x, dict):
        return {k: keras.ops.convert_to_tensor(v) for k, v in x.items()}
    return keras.ops.convert_to_tensor(x)


# -- the trainer -----------------------------------------------------------------------------


def batch_indices(rows: int, batch_size: int, *, shuffle: bool, seed: int) -> Iterator[np.ndarray]:
    """Row indices of each mini-batch of one epoch; the same seed gives the same order."""
    order = np.random.default_rng(seed).permutation(rows) if shuffle else np.arange(rows)
    for start in range(0, rows, batch_size):
        yield order[start : start + batch_size]


def _rows(x: Any) -> int:
    if isinstance(x, dict):
        x = next(iter(x.values()))
    elif isinstance(x, (list, tuple)):
        x = x[0]
    return int(np.shape(x)[0])


def _take(x: Any, index: np.ndarray) -> Any:
    if isinstance(x, dict):
        return {k: np.asarray(v)[index] for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [np.asarray(v)[index] for v in x]
    return np.asarray(x)[index]


def _array_data(what: str, data: Any) -> ArrayData:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise UsageError(f"{what} must be (inputs, labels) numpy arrays, got {type(data).__name__}")
    x, y = data
    y = np.asarray(y)
    rows = _rows(x)
    if rows < 1 or y.shape[0] != rows:
        raise UsageError(f"{what}: {rows} input rows and {y.shape[0]} labels (need the same number, >= 1)")
    return x, y


class KerasTrainer:
    """Round-based training and per-step gradients for a Keras 3 model.

    `model` returns logits (binary: [n, 1]; K classes: [n, K]); `loss` is a Keras loss
    (e.g. `keras.losses.BinaryCrossentropy(from_logits=True)`), `optimizer` a Keras
    optimizer whose state carries over from round to round, as in a local Keras loop.
    `train_data` and `eval_data` are (inputs, labels) with numpy inputs (an array, a
    list or a dict of arrays, as `model.fit` takes them).

    `fit` loads the global weights, runs `train_one_round(config)` and returns the new
    weights. The default round is `model.fit(epochs=config["local_epochs"] or
    local_epochs, batch_size=...)` after `keras.utils.set_random_seed(seed + round)`, so
    one round equals the same `model.fit` run locally; with FedProx (`config["mu"] > 0`)
    it is a GradientTape loop over the same batches with the proximal term. Override
    `train_one_round` for any loop of your own (it returns metrics to report).
    """

    def __init__(
        self,
        model: Any,
        loss: Any,
        optimizer: Any,
        train_data: Any,
        eval_data: Any = None,
        *,
        batch_size: int = 32,
        local_epochs: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        eval_batch_size: int = 1024,
    ) -> None:
        for name, value in {
            "batch_size": batch_size,
            "local_epochs": local_epochs,
            "eval_batch_size": eval_batch_size,
        }.items():
            if not is_int(value) or value < 1:
                raise UsageError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(model, keras.Model):
            raise UsageError(f"KerasTrainer needs a keras.Model, got {type(model).__name__}")
        self.model = model
        self.loss = keras.losses.get(loss) if isinstance(loss, str) else loss
        self.optimizer = keras.optimizers.get(optimizer) if isinstance(optimizer, str) else optimizer
        self.train_data = _array_data("training data", train_data)
        self.eval_data = _array_data("evaluation data", eval_data) if eval_data is not None else None
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.shuffle = shuffle
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.names = variable_names(model)
        self.trainable_names = variable_names(model, trainable_only=True)
        model.compile(optimizer=self.optimizer, loss=self.loss)
        self._batches: Iterator[np.ndarray] | None = None

    @property
    def eval_loader(self) -> ArrayData | None:
        """The evaluation rows under TorchTrainer's name, which the hfl worker reads to know
        whether this trainer evaluates."""
        return self.eval_data

    # -- the contract --------------------------------------------------------------------

    def get_weights(self) -> dict[str, np.ndarray]:
        return get_weights(self.model)

    def set_weights(self, weights: Weights) -> None:
        set_weights(self.model, weights)

    def fit(self, weights: Weights, config: Config) -> FitResult:
        self.set_weights(weights)
        metrics = self.train_one_round(config)
        return FitResult(self.get_weights(), _rows(self.train_data[0]), dict(metrics or {}))

    def evaluate(self, weights: Weights, config: Config) -> EvalResult:
        if self.eval_data is None:
            raise UsageError("this KerasTrainer has no eval_data to evaluate on")
        self.set_weights(weights)
        x, y = self.eval_data
        logits = self.predict_logits(x)
        stats = eval_stats(torch.from_numpy(logits), torch.from_numpy(np.asarray(y)))
        loss = float(
            keras.ops.convert_to_numpy(self.loss(keras.ops.convert_to_tensor(y), keras.ops.convert_to_tensor(logits)))
        )
        pooled = {name: t.numpy() for name, t in stats.to_tensors().items()}
        return EvalResult(loss, stats.count, stats.summary(), stats=pooled)

    def gradients(self, weights: Weights, config: Config) -> GradResult:
        """Gradients of the trainable variables on the next batch of the training stream."""
        self.set_weights(weights)
        if self._batches is None:
            self._batches = self._batch_stream()
        index = next(self._batches)
        x, y = self.train_data
        loss, grads = value_and_grad(self.model, self.loss, _take(x, index), y[index])
        out = {
            name: np.asarray(keras.ops.convert_to_numpy(g)) for name, g in zip(self.trainable_names, grads, strict=True)
        }
        return GradResult(out, len(index), {"loss": loss})

    # -- local training --------------------------------------------------------------------

    def train_one_round(self, config: Config) -> Mapping[str, float]:
        """One round of local training from the weights just loaded; returns metrics to report."""
        epochs = int(config.get("local_epochs") or self.local_epochs)
        batch_size = int(config.get("batch_size") or self.batch_size)
        round_ = int(config.get("round", 1))
        if config.get("lr") is not None:
            self.optimizer.learning_rate = float(config["lr"])
        mu = float(config.get("mu") or 0.0)
        x, y = self.train_data
        if mu == 0.0:
            keras.utils.set_random_seed(self.seed + round_)
            history = self.model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=self.shuffle, verbose=0)
            return {"loss": float(history.history["loss"][-1])}
        return {"loss": self._proximal_round(epochs, batch_size, round_, mu)}

    def _proximal_round(self, epochs: int, batch_size: int, round_: int, mu: float) -> float:
        """FedProx: minimise loss + mu/2 * ||w - w_global||^2 over this round's batches."""
        trainable = self.model.trainable_variables
        start = [keras.ops.copy(v.value) for v in trainable]

        def proximal() -> Any:
            return (mu / 2) * sum(
                keras.ops.sum(keras.ops.square(v.value - s)) for v, s in zip(trainable, start, strict=True)
            )

        x, y = self.train_data
        total, steps = 0.0, 0
        for epoch in range(epochs):
            seed = self.seed + (round_ - 1) * epochs + epoch
            for index in batch_indices(len(y), batch_size, shuffle=self.shuffle, seed=seed):
                loss, grads = value_and_grad(self.model, self.loss, _take(x, index), y[index], penalty=proximal)
                self.optimizer.apply_gradients(zip(grads, trainable, strict=True))
                total, steps = total + loss, steps + 1
        return total / max(steps, 1)

    def _batch_stream(self) -> Iterator[np.ndarray]:
        epoch, rows = 0, len(self.train_data[1])
        while True:
            yield from batch_indices(rows, self.batch_size, shuffle=self.shuffle, seed=self.seed + epoch)
            epoch += 1

    # -- prediction ----------------------------------------------------------------------------

    def predict_logits(self, x: Any) -> np.ndarray:
        """The model's outputs on `x` in inference mode, batch by batch, as float numpy."""
        return predict_logits(self.model, x, batch_size=self.eval_batch_size)


def predict_logits(model: Any, x: Any, *, batch_size: int = 1024) -> np.ndarray:
    """`model`'s outputs on `x` (an array, a list or a dict of arrays) in inference mode, as float32 numpy."""
    rows = _rows(x)
    parts = [
        np.asarray(
            keras.ops.convert_to_numpy(
                model(_tensor(_take(x, np.arange(s, min(s + batch_size, rows)))), training=False)
            )
        )
        for s in range(0, rows, batch_size)
    ]
    return np.concatenate(parts).astype(np.float32, copy=False)


def keras_eval_stats(model: Any, x: Any, y: np.ndarray, *, batch_size: int = 1024) -> Any:
    """The shared evaluation statistics (`enclavefl.train.metrics.EvalStats`) of `model` on (x, y)."""
    return eval_stats(
        torch.from_numpy(predict_logits(model, x, batch_size=batch_size)), torch.from_numpy(np.asarray(y))
    )
