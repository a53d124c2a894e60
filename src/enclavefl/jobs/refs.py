"""References to user code in job files: the one place `module:function` is resolved.

A job file that names `module:function` or `module:Class` (a model, a loss, a trainer, a
strategy, a data factory) makes the party run that code. So a job file is code, and what
it may reach is closed:

1. a built-in name from the caller's registry (`mlp`, `fedavg`, ...);
2. `module:attr` whose top-level module is a Python module or package *beside the job
   file*, or a module the job lists in its `code:` section.

Nothing else is imported: `os:system`, `subprocess:run` or an installed package the job
does not list is refused before any import. The attribute must be a Python function or
class defined in that module (not a builtin, not a value, not something the module
imported from elsewhere), and a class must be of the kind the caller expects before it is
called; callers check what a call returns (`check_returned`).

Everything a job's references can load is measured with the job (`JobCode.measured`):
`enclavefl.tee.measure.simulated_measurement` hashes it into the simulated `mr_enclave`,
and `enclavefl.jobs.gramine.plan_manifest` lists it as trusted files, so a peer that
verifies the measurement verifies the user code too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.machinery import PathFinder
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from enclavefl.errors import ConfigError

__all__ = ["REF_PATTERN", "JobCode", "check_returned", "is_ref", "resolve_ref"]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
REF_PATTERN = re.compile(rf"(?P<module>{_IDENT}(?:\.{_IDENT})*):(?P<attr>{_IDENT}(?:\.{_IDENT})*)")
"""`package.module:attribute.path`."""

T = TypeVar("T")


def is_ref(text: str) -> bool:
    """Whether `text` has the shape of a `module:attr` reference."""
    return REF_PATTERN.fullmatch(text) is not None


@dataclass(frozen=True)
class JobCode:
    """Where a job's user code may come from: modules beside the job file and those it lists.

    `refs` are the references the job file makes (for measurement); `modules` its `code:`
    list. Build it with `JobConfig.code()`.
    """

    job_dir: Path
    modules: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()

    def measured(self) -> dict[str, Path]:
        """Top-level module name -> its `.py` file or package directory, for every module the
        job's references or `code:` list can load: what is measured with the job."""
        tops = dict.fromkeys([*(_top(m) for m in self.modules), *(_top(r) for r in self.refs if is_ref(r))])
        found = {top: self.location(top) for top in tops}
        return {top: path for top, path in found.items() if path is not None}

    def location(self, top: str) -> Path | None:
        """Where top-level module `top` would be loaded from for this job (None: nowhere allowed)."""
        spec = _source_spec(top, [str(self.job_dir)])
        if spec is None and top in {_top(m) for m in self.modules}:
            spec = _source_spec(top, None)
        if spec is None or spec.origin is None:
            return None
        origin = Path(spec.origin).resolve()
        return origin.parent if spec.submodule_search_locations is not None else origin

    def beside_job(self, top: str) -> bool:
        return _source_spec(top, [str(self.job_dir)]) is not None

    def listed(self, module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in self.modules)


def _source_spec(top: str, path: list[str] | None) -> Any:
    """The spec of a top-level module with a source file (a namespace package, i.e. any plain
    directory such as a data folder, is not code)."""
    spec = PathFinder.find_spec(top, path)
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        return None
    return spec


def resolve_ref(
    ref: str,
    *,
    what: str,
    registry: Mapping[str, T] | None = None,
    code: JobCode | None = None,
    expect: type | None = None,
) -> T | Callable[..., Any]:
    """The built-in named `ref` in `registry`, or the function or class `module:attr` names.

    `what` names the job field in errors (e.g. "model.name"). `code` says where user
    modules may come from (None: nowhere, only built-ins). With `expect`, a class must be
    a subclass of it (a function's result is checked by the caller with `check_returned`).
    Raises ConfigError (exit 2) naming the field, the reference and the rule it broke.
    """
    registry = registry or {}
    if ref in registry:
        return registry[ref]
    match = REF_PATTERN.fullmatch(ref)
    if match is None:
        known = f"one of {', '.join(sorted(registry))}, or " if registry else ""
        raise ConfigError(f"{what}: unknown {ref!r}: expected {known}a 'module:function' reference to user code")
    module_name, attr_path = match.group("module"), match.group("attr")
    top = _top(module_name)
    if code is None:
        raise ConfigError(f"{what}: {ref!r}: references to user code are not allowed here")
    beside = code.beside_job(top)
    if not beside and not code.listed(module_name):
        raise ConfigError(
            f"{what}: {ref!r}: module {module_name!r} is neither beside the job file ({code.job_dir}) nor listed "
            "in the job's code: section; job files may only name their own measured code"
        )
    module = _import(module_name, top, code, what, ref) if beside else _import_listed(module_name, what, ref)
    target: Any = module
    for attr in attr_path.split("."):
        if attr.startswith("__") or not hasattr(target, attr):
            raise ConfigError(f"{what}: {ref!r}: {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, attr)
    if not (inspect.isfunction(target) or inspect.isclass(target) or inspect.ismethod(target)):
        raise ConfigError(
            f"{what}: {ref!r} is a {type(target).__name__}, not a Python function or class defined in {top!r}"
        )
    defined_in = getattr(target, "__module__", None) or ""
    if _top(defined_in) != top:
        raise ConfigError(
            f"{what}: {ref!r} is defined in {defined_in!r}, not in {top!r}: name it where it is defined "
            "(and list that module in code: if it is not beside the job file)"
        )
    if expect is not None and inspect.isclass(target) and not issubclass(target, expect):
        raise ConfigError(f"{what}: {ref!r} is a class but not a {expect.__module__}.{expect.__qualname__}")
    return target


def check_returned(value: Any, expect: type | tuple[type, ...], *, what: str, ref: str) -> Any:
    """`value` if a reference's call returned the expected kind of object, else ConfigError."""
    if not isinstance(value, expect):
        kinds = expect if isinstance(expect, tuple) else (expect,)
        names = " or ".join(f"{k.__module__}.{k.__qualname__}" for k in kinds)
        raise ConfigError(f"{what}: {ref!r} returned {type(value).__name__}, not a {names}")
    return value


def _top(name: str) -> str:
    return name.split(":", 1)[0].split(".", 1)[0]


def _import(module_name: str, top: str, code: JobCode, what: str, ref: str) -> ModuleType:
    """Import `module_name` whose top-level package lies beside the job file (and only from there)."""
    loaded = sys.modules.get(top)
    origin = code.location(top)
    if loaded is not None:
        where = getattr(loaded, "__file__", None)
        place = Path(where).resolve() if where else None
        if place is None or origin is None or not (place == origin or origin in place.parents):
            raise ConfigError(
                f"{what}: {ref!r}: module {top!r} beside the job file would shadow the already loaded "
                f"{top!r} ({where or 'built in'}); rename it"
            )
    else:
        spec = _source_spec(top, [str(code.job_dir)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[top] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            del sys.modules[top]
            raise ConfigError(f"{what}: importing {top!r} for {ref!r} failed: {type(exc).__name__}: {exc}") from exc
    return _import_listed(module_name, what, ref)


def _import_listed(module_name: str, what: str, ref: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # the user's module failing to import is the job's error
        raise ConfigError(f"{what}: importing {module_name!r} for {ref!r} failed: {type(exc).__name__}: {exc}") from exc

