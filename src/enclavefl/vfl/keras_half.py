"""Keras halves of a vertical model (extra `[tf]`): a Keras bottom or top inside the vfl roles.

The leader and the follower drive their halves as torch modules (forward, `backward`,
`optimizer.step()`, `state_dict()`); the wire carries numpy only. `KerasHalf` makes a
Keras model one of those modules: its forward runs the Keras model under
`tf.GradientTape` (torch autograd when `KERAS_BACKEND=torch`) inside a torch autograd
function, whose backward is the tape's vector-Jacobian product: gradients for the
inputs (the followers' activations, on a leader) go back to torch, gradients for the
Keras variables wait for `KerasOptimizer.step()`, which applies them with the Keras
optimizer. So a Keras follower works with a torch leader, a Keras top with torch
bottoms, and any mix, and pipelining and recomputation work as for torch halves.

Export writes the native `.keras` archive (architecture and weights), sealed; loading
copies its weights by name into the model the job builds, refusing one whose variables
differ.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from enclavefl.errors import FormatError, UsageError
from enclavefl.extras import import_from_extra
from enclavefl.seal.keys import KeySource
from enclavefl.seal.sealed import read_sealed, write_sealed
from enclavefl.train.keras import get_weights, set_weights, variable_names
from enclavefl.train.optim import PlainOptimizer

keras = import_from_extra("keras", "tf", needed_for="Keras model halves")
saving_lib = keras.src.saving.saving_lib  # the public save_model refuses a file object

__all__ = ["KerasHalf", "KerasOptimizer", "export_keras", "load_keras"]

KERAS_MODEL_VERSION = 1
Pullback = Callable[[np.ndarray], tuple[list[np.ndarray | None], list[Any]]]


def _compiled(model: Any, training: bool) -> Callable[[Any], Any]:
    """The model's call, as one compiled graph under TensorFlow (a recording tape sees it as
    one op and differentiates it compiled too), as it is under the other backends."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: model(x, training=training), reduce_retracing=True)
    return lambda x: model(x, training=training)


def _record(
    model: Any, call: Callable[[Any], Any], inputs: list[np.ndarray], want_inputs: list[bool]
) -> tuple[np.ndarray, Pullback]:
    """Run `call` (the model in training mode), recording; returns (outputs, pullback of the output gradient)."""
    backend = keras.backend.backend()
    trainable = model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        xs = [tf.convert_to_tensor(x) for x in inputs]
        with tf.GradientTape() as tape:
            for x, wanted in zip(xs, want_inputs, strict=True):
                if wanted:
                    tape.watch(x)
            out = call(xs if len(xs) > 1 else xs[0])

        def tf_pullback(grad: np.ndarray) -> tuple[list[np.ndarray | None], list[Any]]:
            sources = [x for x, wanted in zip(xs, want_inputs, strict=True) if wanted]
            targets = [*sources, *trainable]
            grads = tape.gradient(out, targets, output_gradients=tf.convert_to_tensor(grad),
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            found = iter(grads[: len(sources)])
            return [next(found).numpy() if wanted else None for wanted in want_inputs], list(grads[len(sources) :])

        return out.numpy(), tf_pullback
    if backend == "torch":
        with torch.enable_grad():
            ts = [torch.from_numpy(x).requires_grad_(wanted) for x, wanted in zip(inputs, want_inputs, strict=True)]
            out = call(ts if len(ts) > 1 else ts[0])

        def torch_pullback(grad: np.ndarray) -> tuple[list[np.ndarray | None], list[Any]]:
            sources = [t for t in ts if t.requires_grad]
            params = [v.value for v in trainable]
            grads = torch.autograd.grad(
                out, [*sources, *params], grad_outputs=torch.from_numpy(grad), allow_unused=True
            )
            found = iter(grads[: len(sources)])
            inputs_grad = [next(found).detach().numpy() if t.requires_grad else None for t in ts]
            var_grads = [
                g if g is not None else torch.zeros_like(p) for g, p in zip(grads[len(sources) :], params, strict=True)
            ]
            return inputs_grad, var_grads

        return out.detach().numpy(), torch_pullback
    raise UsageError(f"Keras halves support KERAS_BACKEND tensorflow or torch, not {backend!r}")


def _compiled_apply(optimizer: Any, variables: list[Any]) -> Callable[[list[Any]], Any]:
    """optimizer.apply_gradients for these variables; one compiled graph under TensorFlow
    (eager, the Keras optimizer step costs ten times the model's own forward and backward)."""

    def apply(grads: list[Any]) -> Any:
        return optimizer.apply_gradients(zip(grads, variables, strict=True))

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(apply)
    return apply


class _KerasCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, half: KerasHalf, anchor: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        arrays = [np.ascontiguousarray(t.detach().numpy()) for t in inputs]
        outputs, pullback = _record(half.keras_model, half.train_call, arrays, [t.requires_grad for t in inputs])
        ctx.half, ctx.pullback = half, pullback
        return torch.from_numpy(np.asarray(outputs, dtype=np.float32))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        inputs_grad, variables_grad = ctx.pullback(np.ascontiguousarray(grad.detach().numpy()))
        ctx.half.accumulate(variables_grad)
        return (None, None, *(torch.from_numpy(g) if g is not None else None for g in inputs_grad))


class KerasHalf(nn.Module):
    """A Keras model as a vfl half: called with a tensor or a list of tensors (float32).

    A top model with one input receives the list concatenated along the columns, as
    `TopMLP` does; one with several inputs receives them in order. `state_dict()` holds
    the Keras weights by stable name, so checkpoints and snapshots work unchanged.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        if not isinstance(model, keras.Model):
            raise UsageError(f"KerasHalf needs a keras.Model, got {type(model).__name__}")
        # Kept out of nn.Module's registry: under KERAS_BACKEND=torch the model is itself a
        # torch module, and its parameters must not be stepped or saved twice.
        object.__setattr__(self, "keras_model", model)
        self.names = variable_names(model)
        self.train_call = _compiled(model, training=True)
        self._predict_call = _compiled(model, training=False)
        self._pending: list[Any] | None = None
        # The Keras variables are invisible to torch: this empty tensor that requires grad makes
        # torch record the call (and run its backward) even when no input requires grad.
        self._anchor = torch.zeros(0, requires_grad=True)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        parts = [x] if isinstance(x, torch.Tensor) else list(x)
        if len(parts) > 1 and len(self.keras_model.inputs) == 1:  # type: ignore[arg-type, union-attr]
            parts = [torch.cat(parts, dim=1)]
        parts = [p.float() for p in parts]
        if self.training and torch.is_grad_enabled():
            return _KerasCall.apply(self, self._anchor, *parts)
        model_input = [p.detach().numpy() for p in parts]
        out = self._predict_call(model_input if len(model_input) > 1 else model_input[0])
        return torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32))

    # -- gradients -----------------------------------------------------------------------

    def accumulate(self, grads: list[Any]) -> None:
        """Add one backward pass's variable gradients to those waiting for the optimizer."""
        if self._pending is None:
            self._pending = grads
        else:
            self._pending = [a + b for a, b in zip(self._pending, grads, strict=True)]

    def take_gradients(self) -> list[Any] | None:
        grads, self._pending = self._pending, None
        return grads

    # -- state ---------------------------------------------------------------------------

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name, value in get_weights(self.keras_model).items():
            destination[prefix + name] = torch.from_numpy(value)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        mine = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            set_weights(
                self.keras_model,
                {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in mine.items()},
            )
        except UsageError as exc:
            error_msgs.append(str(exc))
        unexpected_keys.extend(prefix + k for k in mine if k not in self.names)


class KerasOptimizer:
    """The optimizer of a half that holds Keras parts: applies each part's pending
    gradients with its Keras optimizer, and steps an optional torch optimizer for the
    torch parameters beside them (a torch bottom under a Keras top, say)."""

    def __init__(
        self,
        parts: Sequence[tuple[KerasHalf, Any]],
        torch_optimizer: torch.optim.Optimizer | PlainOptimizer | None = None,
    ) -> None:
        self.parts = list(parts)
        self.torch_optimizer = torch_optimizer
        self._apply = []
        for half, optimizer in self.parts:
            optimizer.build(half.keras_model.trainable_variables)  # type: ignore[union-attr]
            self._apply.append(_compiled_apply(optimizer, half.keras_model.trainable_variables))  # type: ignore[arg-type, union-attr]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for half, _ in self.parts:
            half.take_gradients()
        if self.torch_optimizer is not None:
            self.torch_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for (half, _), apply in zip(self.parts, self._apply, strict=True):
            grads = half.take_gradients()
            if grads is not None:
                apply(grads)
        if self.torch_optimizer is not None:
            self.torch_optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "keras": [
                [torch.from_numpy(np.array(v.numpy())) for v in optimizer.variables] for _, optimizer in self.parts
            ],
            "torch": self.torch_optimizer.state_dict() if self.torch_optimizer is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("keras")
        if not isinstance(saved, list) or len(saved) != len(self.parts):
            raise UsageError("optimizer state: not the state of this half's Keras optimizers")
        for values, (_, optimizer) in zip(saved, self.parts, strict=True):
            if len(values) != len(optimizer.variables):
                raise UsageError(
                    f"optimizer state: {len(values)} Keras optimizer variables saved, "
                    f"this optimizer has {len(optimizer.variables)}"
                )
            for value, variable in zip(values, optimizer.variables, strict=True):
                variable.assign(value.numpy())
        if self.torch_optimizer is not None:
            self.torch_optimizer.load_state_dict(state["torch"])


# -- export ----------------------------------------------------------------------------------


def export_keras(model: Any, path: str | os.PathLike[str], *, key: KeySource, job_id: str, artifact: str) -> Path:
    """Seal `model` as a native `.keras` archive to `path` (the archive never touches the disk in clear)."""
    buffer = io.BytesIO()
    saving_lib.save_model(model, buffer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_sealed(path, key=key, job_id=job_id, name=artifact, version=KERAS_MODEL_VERSION) as out:
        out.write(buffer.getbuffer())
    return path


def load_keras(model: Any, path: str | os.PathLike[str], *, key: KeySource, job_id: str, artifact: str) -> Any:
    """Unseal the `.keras` archive at `path` and copy its weights, by name, into `model`."""
    plain = read_sealed(path, key=key, job_id=job_id, name=artifact, version=KERAS_MODEL_VERSION)
    try:
        saved = saving_lib.load_model(io.BytesIO(plain), compile=False, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: the exported Keras model does not load: {exc}") from None
    set_weights(model, get_weights(saved))
    return model
