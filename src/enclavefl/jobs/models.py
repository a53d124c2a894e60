"""A job's models: built-ins by name, user models only through `resolve_ref`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from enclavefl.errors import ConfigError
from enclavefl.extras import import_from_extra
from enclavefl.jobs.config import JobConfig, ModelSpec
from enclavefl.jobs.refs import check_returned, resolve_ref
from enclavefl.models.keras_mlp import KERAS_BUILTINS
from enclavefl.models.registry import BUILTINS, builtin_model

__all__ = ["build_job_model", "model_factory"]


def model_factory(spec: ModelSpec, job: JobConfig, *, what: str) -> Callable[..., Any]:
    """The factory `spec.name` names: a built-in, or the job's own measured code (`what`: the
    job field, e.g. "model.name", for errors). Keras models have their own built-ins."""
    if spec.uses_keras():
        return resolve_ref(spec.name, what=what, registry=KERAS_BUILTINS, code=job.job_code())
    builtin = builtin_model(spec.name)
    if builtin is not None:
        return builtin
    return resolve_ref(spec.name, what=what, registry=BUILTINS, code=job.job_code(), expect=nn.Module)


def build_job_model(spec: ModelSpec, job: JobConfig, *, what: str, **overrides: Any) -> Any:
    """The model of `spec` built with its args (and `overrides`). Arguments it does not take
    or refuses, and a factory that does not return a torch.nn.Module (keras: a keras.Model),
    are ConfigErrors that name the field (`what`: e.g. "model.name"; its args are beside it)."""
    factory = model_factory(spec, job, what=what)
    args = {**spec.args, **overrides}
    at = f"{what.rsplit('.', 1)[0]}.args"
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as exc:
        raise ConfigError(f"{at}: {spec.name!r} does not take {sorted(args)}: {exc}") from None
    except ValueError:
        pass  # no signature to check (a C-level class): the call below reports bad arguments
    try:
        model = factory(**args)
    except (TypeError, ValueError) as exc:  # the constructor refused an argument's value
        raise ConfigError(f"{at}: {spec.name!r} refused its arguments: {type(exc).__name__}: {exc}") from None
    if spec.uses_keras():
        keras = import_from_extra("keras", "tf", needed_for="Keras models")
        return check_returned(model, keras.Model, what=what, ref=spec.name)
    return check_returned(model, nn.Module, what=what, ref=spec.name)
