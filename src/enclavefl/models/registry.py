"""Build a model by name (a built-in: "resnet20", "dlrm", ...) or from a user's factory."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from enclavefl.errors import UsageError
from enclavefl.models.dlrm import DLRM
from enclavefl.models.mlp import mlp
from enclavefl.models.resnet import resnet_v2
from enclavefl.models.split_mlp import BottomMLP, TopMLP
from enclavefl.models.wide_deep import WideDeepFollower, WideDeepLeader, unsplit_wide_deep

BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": partial(resnet_v2, depth=20),
    "resnet56": partial(resnet_v2, depth=56),
    "resnet_v2": resnet_v2,
    "dlrm": DLRM,
    "mlp": mlp,
    "bottom_mlp": BottomMLP,
    "top_mlp": TopMLP,
    "wide_deep_follower": WideDeepFollower,
    "wide_deep_leader": WideDeepLeader,
    "wide_deep": unsplit_wide_deep,
}

_RESNET_NAME = re.compile(r"resnet(\d+)")

__all__ = ["BUILTINS", "build_model", "builtin_model"]


def build_model(name_or_factory: str | Callable[..., nn.Module], /, **kwargs: Any) -> nn.Module:
    """Build a built-in model by name, or call a model factory with `kwargs`.

    "resnet<depth>" works for any valid depth (6n+2). A factory (a user's function or
    class, resolved by `enclavefl.jobs.refs.resolve_ref`, which decides what a job file may
    import) must accept `kwargs` and return a torch.nn.Module; both are checked.
    """
    if isinstance(name_or_factory, str):
        factory = builtin_model(name_or_factory)
        if factory is None:
            raise UsageError(
                f"unknown model {name_or_factory!r}: use one of {sorted(BUILTINS)} or resnet<depth>; "
                "user models are passed as a factory (job files: 'module:function', see docs/jobs.md)"
            )
        name = name_or_factory
    else:
        factory, name = name_or_factory, getattr(name_or_factory, "__qualname__", repr(name_or_factory))
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise UsageError(f"model {name!r}: bad arguments {sorted(kwargs)}: {exc}") from None
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def builtin_model(name: str) -> Callable[..., nn.Module] | None:
    """The factory of built-in model `name` (resnet<depth> included), or None."""
    if name in BUILTINS:
        return BUILTINS[name]
    match = _RESNET_NAME.fullmatch(name)
    if match:
        return partial(resnet_v2, depth=int(match.group(1)))
    return None
