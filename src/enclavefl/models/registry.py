"""Build a model by name: a built-in ("resnet20", "dlrm", ...) or a user's `module:function`."""

from __future__ import annotations

import importlib
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


def build_model(name_or_ref: str, **kwargs: Any) -> nn.Module:
    """Build a built-in model by name, or call `package.module:function(**kwargs)`.

    "resnet<depth>" works for any valid depth (6n+2). A user reference is imported and
    called with `kwargs`; it must return a torch.nn.Module.
    """
    factory = _resolve(name_or_ref)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise UsageError(f"model {name_or_ref!r}: bad arguments {sorted(kwargs)}: {exc}") from None
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {name_or_ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _resolve(name_or_ref: str) -> Callable[..., nn.Module]:
    if name_or_ref in BUILTINS:
        return BUILTINS[name_or_ref]
    match = _RESNET_NAME.fullmatch(name_or_ref)
    if match:
        return partial(resnet_v2, depth=int(match.group(1)))
    if ":" not in name_or_ref:
        raise UsageError(
            f"unknown model {name_or_ref!r}: use one of {sorted(BUILTINS)}, "
            "resnet<depth>, or a 'package.module:function' reference"
        )
    module_name, _, attr_path = name_or_ref.partition(":")
    if not module_name or not attr_path:
        raise UsageError(f"model reference {name_or_ref!r} must look like 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {module_name!r} for model {name_or_ref!r}: {exc}") from None
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise UsageError(f"model {name_or_ref!r}: {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise UsageError(f"model {name_or_ref!r} is not callable (it is of type {type(target).__name__})")
    return target
