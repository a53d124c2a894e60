"""The pip user's path: the wheel built from this tree, installed into fresh virtualenvs.

One wheel per session. Each virtualenv gets the wheel (`pip install --no-index --no-deps`)
and, linked in from the test interpreter's environment, exactly the distributions its
metadata requires (the core's closure, or the closure with [ml]): no network, no second
copy of torch, and nothing the wheel does not declare. `pip check` then proves that the
declared dependencies are what is installed. Commands run from temporary directories
outside the repository, with no ../shared beside them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import PINNED_TIME, REPO, SHARED_DATA

SOURCES = ("pyproject.toml", "README.md", "LICENSE", "src")
TEMPLATES = ("hfl-tabular", "hfl-custom-loop", "vfl-tabular", "vfl-keras")
KERAS_TEMPLATES = ("vfl-keras",)  # need the [tf] extra
HAVE_TF = all(importlib.util.find_spec(m) is not None for m in ("keras", "tensorflow"))
ML_HINT = "pip install 'enclavefl[ml]'"


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel` of a copy of this tree (a build never writes into the checkout)."""
    tree = tmp_path_factory.mktemp("wheel-src")
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tree / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(source, tree / name)
    dist = tmp_path_factory.mktemp("dist")
    _check([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
            "--wheel-dir", str(dist), str(tree)])
    (built,) = dist.glob("enclavefl-*.whl")
    return built


def _check(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300, **kwargs)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _wheel_requirements(wheel: Path, extras: set[str]) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    requirements = [Requirement(line.split(":", 1)[1].strip())
                    for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    chosen = [r for r in requirements
              if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (extras or {""}))]
    for requirement in chosen:
        requirement.marker = None  # decided here: the closure evaluates only its own markers
    return chosen


def _closure(requirements: list[Requirement]) -> dict[str, object]:
    """The installed distributions `requirements` need, recursively (name -> Distribution)."""
    found: dict[str, object] = {}
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            pytest.fail(f"{requirement} is required by the wheel but not installed in the test environment")
        found[name] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return found


def _make_venv(root: Path, wheel: Path, extras: set[str]) -> Path:
    """A virtualenv with the wheel and, linked in, exactly the distributions it requires."""
    _check([sys.executable, "-m", "venv", "--without-pip", str(root)])
    python = root / "bin" / "python"
    site = Path(_check([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    for dist in _closure(_wheel_requirements(wheel, extras)).values():
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")} - {"__pycache__"}
        for top in tops:
            source, target = Path(dist.locate_file(top)), site / top
            if not target.exists() and source.exists():
                target.symlink_to(source)
    spec = f"{wheel}[{','.join(sorted(extras))}]" if extras else str(wheel)
    _check([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index", "--no-deps",
            spec])
    _check([sys.executable, "-m", "pip", "--python", str(python), "check"])
    return root


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "ENCLAVEFL_SHARED_DATA")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return env


def _enclavefl(venv: Path, *args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "enclavefl"), *args], capture_output=True, text=True, check=False,
                          cwd=cwd, env=_env(venv), timeout=timeout)


@pytest.fixture(scope="session")
def core_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = _make_venv(tmp_path_factory.mktemp("venv-core"), wheel, set())
    for module in ("torch", "sklearn", "matplotlib"):
        probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is not None)"
        found = subprocess.run([str(venv / "bin" / "python"), "-c", probe], env=_env(venv), check=False)
        assert found.returncode == 0, (
            f"{module} is importable in the core virtualenv")
    return venv


@pytest.fixture(scope="session")
def ml_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_venv(tmp_path_factory.mktemp("venv-ml"), wheel, {"ml", "tf"} if HAVE_TF else {"ml"})


# --------------------------------------------------------------------------- the wheel itself


def test_wheel_metadata_is_complete(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Python: >=3.11" in metadata
    assert re.search(r"^Project-URL: Changelog, https://", metadata, re.M)
    assert "Classifier: Programming Language :: Python :: 3.11" in metadata
    assert "Provides-Extra: ml" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for data in ("enclavefl/share/gramine/enclavefl.manifest.template", "enclavefl/py.typed",
                 *(f"enclavefl/share/templates/{t}/job.yaml" for t in TEMPLATES)):
        assert data in names


# --------------------------------------------------------------------------- core only


def test_version_comes_from_the_package_metadata(core_venv: Path, wheel: Path, tmp_path: Path) -> None:
    version = wheel.name.split("-")[1]
    done = _enclavefl(core_venv, "--version", cwd=tmp_path)
    assert done.returncode == 0 and version in done.stdout
    probe = subprocess.run([str(core_venv / "bin" / "python"), "-c", "import enclavefl; print(enclavefl.__version__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=_env(core_venv), check=True)
    assert probe.stdout.strip() == version


def test_verify_works_without_the_ml_extra(core_venv: Path, tmp_path: Path) -> None:
    quotes = SHARED_DATA / "attestation"
    if not quotes.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared test data not found at {quotes}: CI must provide it")
        pytest.skip(f"shared test data not found at {quotes} (clone with ../shared beside the repo)")
    # The sample quote's platform needs configuration and SW hardening: allowed explicitly.
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allowed_tcb_status": ["UpToDate", "ConfigurationAndSWHardeningNeeded"]}))
    done = _enclavefl(core_venv, "verify", "--quote", str(quotes / "sgx_quote"),
                      "--collateral", str(quotes / "sgx_quote_collateral.json"), "--at", str(PINNED_TIME),
                      "--policy", str(policy), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["accepted"] and result["tee"] == "sgx"
    assert result["mr_enclave"] == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


def test_demo_and_run_without_the_ml_extra_name_it(core_venv: Path, tmp_path: Path) -> None:
    done = _enclavefl(core_venv, "demo", "--work", str(tmp_path / "demo"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert ML_HINT in done.stderr and "Traceback" not in done.stderr
    # `new` needs only the core; running what it wrote needs [ml].
    assert _enclavefl(core_venv, "new", "proj", "--template", "hfl-tabular", cwd=tmp_path).returncode == 0
    done = _enclavefl(core_venv, "run", "proj/job.yaml", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert ML_HINT in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "proj" / "runs").exists(), "no party was started"
    assert _enclavefl(core_venv, "new", "keras", "--template", "vfl-keras", cwd=tmp_path).returncode == 0
    done = _enclavefl(core_venv, "run", "keras/job.yaml", cwd=tmp_path)
    assert done.returncode == 2 and "pip install 'enclavefl[ml,tf]'" in done.stderr, done.stderr


# --------------------------------------------------------------------------- with [ml]


def _run_projects(venv: Path, tmp_path: Path, templates: tuple[str, ...]) -> None:
    """`enclavefl new` for each template, then `enclavefl run` of each from an unrelated directory.

    The jobs run side by side: each is mostly process start-up and round trips, so together
    they take little longer than the slowest alone.
    """
    projects, elsewhere = tmp_path / "projects", tmp_path / "elsewhere"
    projects.mkdir()
    elsewhere.mkdir()
    for template in templates:
        done = _enclavefl(venv, "new", template, "--template", template, cwd=projects)
        assert done.returncode == 0, done.stderr
    runs = {template: subprocess.Popen([str(venv / "bin" / "enclavefl"), "run", str(projects / template / "job.yaml")],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=elsewhere,
                                       env=_env(venv))
            for template in templates}
    try:
        output = {template: run.communicate(timeout=400)[0] for template, run in runs.items()}
    finally:
        for run in runs.values():
            run.kill()
    for template, run in runs.items():
        assert run.returncode == 0, f"{template}:\n{output[template]}"
        summary = json.loads((projects / template / "runs" / "summary.json").read_text())
        parties = summary["parties"]
        assert parties and all(p["attested"] and p["exit_code"] == 0 for p in parties.values()), (template, parties)
        assert summary["metrics"]["auc"] > 0.8, (template, summary["metrics"])
        if (projects / template / "trainer.py").exists():  # the workers ran the project's own loop
            log = (projects / template / "runs" / "logs" / "worker-1.log").read_text()
            assert "INFO trainer: custom loop: 2 epochs of Adam over 600 rows" in log
    assert not any(elsewhere.iterdir()), "a run wrote into its working directory"


def test_every_template_runs_from_anywhere(ml_venv: Path, tmp_path: Path) -> None:
    templates = TEMPLATES
    if not HAVE_TF:  # `make test` installs [tf]; a bare environment runs the torch templates only
        if os.environ.get("CI") == "true":
            pytest.fail("keras/tensorflow ([tf] extra) not installed: CI must run the Keras templates")
        templates = tuple(t for t in TEMPLATES if t not in KERAS_TEMPLATES)
    _run_projects(ml_venv, tmp_path, templates)


def test_new_lists_the_templates(ml_venv: Path, tmp_path: Path) -> None:
    done = _enclavefl(ml_venv, "new", "--list", cwd=tmp_path)
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == list(TEMPLATES)


def test_gramine_build_renders_the_manifest_from_the_wheel(ml_venv: Path, tmp_path: Path) -> None:
    assert _enclavefl(ml_venv, "new", "proj", "--template", "hfl-tabular", cwd=tmp_path).returncode == 0
    done = _enclavefl(ml_venv, "gramine", "build", "proj/job.yaml", "--name", "worker-1", "--out", "build",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = (tmp_path / "build" / "enclavefl.manifest.template").read_text()
    site = Path(_check([str(ml_venv / "bin" / "python"), "-c",
                        "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    assert f'"file:{site.resolve()}/"' in manifest or f'"file:{site}/"' in manifest, "the venv's packages are trusted"
    assert f'"file:{(tmp_path / "proj" / "model.py").resolve()}"' in manifest, "the user's model is measured"
    assert f'"file:{(tmp_path / "proj" / "data").resolve()}/"' in manifest, "the worker's data is allowed"
    assert str(REPO) not in manifest, "nothing comes from the checkout"
