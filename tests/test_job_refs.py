"""`module:function` references in job files: what they may reach, what they must return,
and that the code they load is measured with the job (issue 12, item 11)."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from torch import nn

from enclavefl.errors import ConfigError
from enclavefl.jobs.config import load_job
from enclavefl.jobs.demo import SIMULATED_POLICY
from enclavefl.jobs.gramine import plan_manifest
from enclavefl.jobs.hfl_job import build_global_model
from enclavefl.jobs.refs import JobCode, resolve_ref
from enclavefl.tee.measure import simulated_measurement

USER_MODULE = "enclavefl_refs_t_models"
USER_CODE = """
import os
from pathlib import Path

import torch
from torch.nn import Linear


def make(in_features, out_features=1):
    return torch.nn.Linear(in_features, out_features)


def not_a_model(in_features):
    return in_features


class NotAModel:
    def __init__(self, in_features):
        Path(os.environ["ENCLAVEFL_REFS_T_MARKER"]).write_text("constructed")


CONSTANT = 4
"""


@pytest.fixture(autouse=True)
def _forget_user_modules() -> Iterator[None]:
    yield
    for name in [USER_MODULE, "json_t_shadow"]:
        sys.modules.pop(name, None)


def job_file(directory: Path, model: dict[str, Any], *, code: list[str] | None = None,
             user_code: str | None = USER_CODE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    if user_code is not None:
        (directory / f"{USER_MODULE}.py").write_text(textwrap.dedent(user_code))
    job = {
        "job": {"name": "refs", "mode": "hfl"},
        "parties": [
            {"name": "ps", "role": "server", "address": "localhost:50051"},
            {"name": "w0", "role": "worker", "data": {"kind": "csv", "path": "w0.csv", "label": "y"}},
        ],
        "tee": {"attester": "simulated", "allow_simulated_insecure": True},
        "policy": "policy.json",
        "model": model,
        "strategy": {"name": "fedavg", "rounds": 1, "batch_size": 4, "lr": 0.1},
        "output": {"dir": str(directory / "out")},
        **({"code": code} if code is not None else {}),
    }
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_os_system_in_a_job_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    job = load_job(job_file(tmp_path, {"name": "os:system", "args": {"command": f"touch {marker}"}}))
    with pytest.raises(ConfigError, match=r"model.name: 'os:system': module 'os' is neither beside the job file"):
        build_global_model(job)
    assert not marker.exists()


def test_listing_a_module_does_not_make_its_builtins_callable(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    job = load_job(job_file(tmp_path, {"name": "os:system", "args": {"command": f"touch {marker}"}}, code=["os"]))
    with pytest.raises(ConfigError, match=r"'os:system' is a builtin_function_or_method, not a Python function"):
        build_global_model(job)
    assert not marker.exists()


def test_a_module_beside_the_job_file_provides_the_model(tmp_path: Path) -> None:
    job = load_job(job_file(tmp_path, {"name": f"{USER_MODULE}:make", "args": {"in_features": 3}}))
    model = build_global_model(job)
    assert isinstance(model, nn.Linear) and model.in_features == 3
    assert job.job_code().measured() == {USER_MODULE: (tmp_path / f"{USER_MODULE}.py").resolve()}


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        (f"{USER_MODULE}:not_a_model", "returned int, not a torch.nn.modules.module.Module"),
        (f"{USER_MODULE}:NotAModel", "is a class but not a torch.nn.modules.module.Module"),
        (f"{USER_MODULE}:CONSTANT", "is a int, not a Python function or class"),
        (f"{USER_MODULE}:Linear", "is defined in 'torch.nn.modules.linear', not in"),
        (f"{USER_MODULE}:absent", "has no attribute 'absent'"),
        (f"{USER_MODULE}:make.__globals__", "has no attribute"),
        ("json:loads", "module 'json' is neither beside the job file"),
        ("subprocess:run", "module 'subprocess' is neither beside the job file"),
        ("enclavefl.cli:main", "module 'enclavefl.cli' is neither beside the job file"),
        ("nosuchmodel", "unknown 'nosuchmodel'"),
    ],
)
def test_what_a_reference_names_and_returns_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, fragment: str
) -> None:
    marker = tmp_path / "constructed"
    monkeypatch.setenv("ENCLAVEFL_REFS_T_MARKER", str(marker))
    job = load_job(job_file(tmp_path, {"name": name, "args": {"in_features": 3}}))
    with pytest.raises(ConfigError, match=r"model\.name") as caught:
        build_global_model(job)
    assert fragment in caught.value.reason
    assert not marker.exists()  # a class of the wrong kind is refused before it is called


def test_a_listed_module_is_importable_but_what_it_returns_is_checked(tmp_path: Path) -> None:
    job = load_job(job_file(tmp_path, {"name": "json:loads", "args": {"s": "[1]"}}, code=["json"]))
    with pytest.raises(ConfigError, match=r"'json:loads' returned list, not a torch.nn.modules.module.Module"):
        build_global_model(job)
    assert "json" in job.job_code().measured()


def test_a_module_beside_the_job_may_not_shadow_a_loaded_one(tmp_path: Path) -> None:
    (tmp_path / "yaml.py").write_text("def make():\n    return None\n")
    job = load_job(job_file(tmp_path, {"name": "yaml:make"}))
    with pytest.raises(ConfigError, match="would shadow the already loaded 'yaml'"):
        build_global_model(job)


def test_a_data_directory_beside_the_job_is_not_code(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    code = JobCode(tmp_path, refs=("data:load",))
    assert code.measured() == {}
    with pytest.raises(ConfigError, match="module 'data' is neither beside the job file"):
        resolve_ref("data:load", what="data.factory", code=code)


def test_user_code_is_part_of_the_measurement(tmp_path: Path) -> None:
    path = job_file(tmp_path, {"name": f"{USER_MODULE}:make", "args": {"in_features": 3}})
    job = load_job(path)
    before = simulated_measurement([path], code=job.job_code().measured())
    assert before != simulated_measurement([path])
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_CODE + "\n# edited\n")
    assert simulated_measurement([path], code=job.job_code().measured()) != before


def test_gramine_measures_the_user_code(tmp_path: Path) -> None:
    path = job_file(tmp_path, {"name": f"{USER_MODULE}:make", "args": {"in_features": 3}})
    plan = plan_manifest(path, "w0")
    assert f"file:{(tmp_path / f'{USER_MODULE}.py').resolve()}" in plan.trusted


def test_code_section_names_modules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"code\[0\]: 'not a module' is not a Python module name"):
        load_job(job_file(tmp_path, {"name": "mlp"}, code=["not a module"]))
    with pytest.raises(ConfigError, match=r"model.name: 'a b' is neither a built-in name nor"):
        load_job(job_file(tmp_path, {"name": "a b"}))
