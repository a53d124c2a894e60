"""A model as named tensors: trainable parameters, persistent buffers, embedding tables.

Names are those of `model.named_parameters()` / `model.named_buffers()`. Buffers are the
persistent ones only (BatchNorm running_mean, running_var, num_batches_tracked); a
non-persistent buffer is derived by the module itself and never travels. A tied
parameter appears once, under the name `named_parameters()` gives it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from enclavefl.errors import UsageError
from enclavefl.models.embeddings import embedding_parameter_names

__all__ = [
    "buffer_names",
    "check_like",
    "check_state",
    "embedding_names",
    "load_state",
    "model_state",
    "parameter_names",
]


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the strategies train (those with requires_grad)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def buffer_names(model: nn.Module) -> list[str]:
    """Names of the persistent buffers (the ones `state_dict()` saves)."""
    persistent = set(model.state_dict(keep_vars=True))
    return [name for name, _ in model.named_buffers() if name in persistent]


def embedding_names(model: nn.Module) -> frozenset[str]:
    """Trainable parameter names that are nn.Embedding / nn.EmbeddingBag tables."""
    return frozenset(embedding_parameter_names(model)) & frozenset(parameter_names(model))


def _live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    tensors.update((name, buffers[name]) for name in buffer_names(model))
    return tensors


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter (frozen ones included) and persistent buffer."""
    return {name: t.detach().clone() for name, t in _live_tensors(model).items()}


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the model in place (optimizers keep their references).

    The names must be exactly those of `model_state(model)`, with the same shapes and
    dtypes; everything is checked before anything is written.
    """
    check_state(model, state)
    with torch.no_grad():
        for name, target in _live_tensors(model).items():
            target.copy_(state[name])


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise UsageError unless `load_state(model, state)` would succeed."""
    live = _live_tensors(model)
    missing = sorted(set(live) - set(state))
    unexpected = sorted(set(state) - set(live))
    if missing or unexpected:
        raise UsageError(f"model state does not match the model: missing {missing}, unexpected {unexpected}")
    for name, target in live.items():
        check_like(f"model state {name!r}", state[name], target)


def check_like(what: str, tensor: object, like: torch.Tensor) -> None:
    """Raise UsageError unless `tensor` is a dense tensor with `like`'s shape and dtype."""
    if not isinstance(tensor, torch.Tensor) or tensor.is_sparse:
        raise UsageError(f"{what}: expected a dense tensor, got {type(tensor).__name__}")
    if tensor.shape != like.shape or tensor.dtype != like.dtype:
        raise UsageError(
            f"{what}: expected {like.dtype} {list(like.shape)}, got {tensor.dtype} {list(tensor.shape)}"
        )
