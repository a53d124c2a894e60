"""Optional extras: a command or job that needs a missing extra exits 2 with the install line.

The wheel test (test_wheel.py) shows the same in a real environment without the extras; these
hide modules in-process so that every command and job feature is covered in milliseconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from enclavefl import extras
from enclavefl.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def hide(monkeypatch: pytest.MonkeyPatch):
    """hide("torch", ...): find_spec reports those modules missing, as in an install without the extra."""

    real = importlib.util.find_spec

    def hide_modules(*names: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name.partition(".")[0] in names else real(name, *a))

    return hide_modules


def test_install_line_is_the_exact_pip_command() -> None:
    assert extras.install_line(["ml"]) == "pip install 'enclavefl[ml]'"
    assert extras.install_line(["ml", "dp", "ml"]) == "pip install 'enclavefl[ml,dp]'"


def test_every_declared_extra_is_an_extra_of_the_distribution() -> None:
    from importlib.metadata import metadata

    declared = set(metadata("enclavefl").get_all("Provides-Extra") or [])
    # tf, dp and tracking join pyproject.toml with the features that need them.
    assert "ml" in declared
    assert {e for needed in extras.COMMAND_EXTRAS.values() for e in needed} <= set(extras.EXTRAS)
    assert {f.extra for f in extras.JOB_FEATURES} <= set(extras.EXTRAS)


def test_demo_without_ml_names_the_extra(hide) -> None:
    hide("torch")
    result = CliRunner().invoke(main, ["demo", "--work", "unused"])
    assert result.exit_code == 2, result.output
    assert "pip install 'enclavefl[ml]'" in result.output
    assert "torch not importable" in result.output


@pytest.mark.parametrize("command", [["run"], ["align"], ["party", "--name", "guest"],
                                     ["predict", "--input", "guest=x.csv"]])
def test_job_commands_without_ml_name_the_extra(hide, command: list[str]) -> None:
    hide("sklearn")
    job = EXAMPLES / "vfl_breast.yaml"
    result = CliRunner().invoke(main, [command[0], str(job), *command[1:]])
    assert result.exit_code == 2, result.output
    assert f"job {job} (training) needs [ml]" in result.output
    assert "pip install 'enclavefl[ml]'" in result.output


def test_gramine_build_without_ml_names_the_extra(hide, tmp_path: Path) -> None:
    hide("matplotlib")
    result = CliRunner().invoke(main, ["gramine", "build", str(EXAMPLES / "vfl_breast.yaml"), "--name", "guest",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2 and "pip install 'enclavefl[ml]'" in result.output
    assert not any(tmp_path.iterdir()), "nothing is built for an enclave that could not train"


def test_a_job_feature_adds_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from enclavefl.jobs.config import load_job

    job = load_job(EXAMPLES / "vfl_breast.yaml")
    feature = extras.JobFeature("a test feature", "dp", lambda j: j.job.name == "vfl-breast")
    monkeypatch.setattr(extras, "JOB_FEATURES", (*extras.JOB_FEATURES, feature))
    assert extras.extras_for_job(job) == {"ml": ["training"], "dp": ["a test feature"]}
    if importlib.util.find_spec("opacus") is None:
        with pytest.raises(extras.MissingExtra, match=r"a test feature\) needs \[dp\].*pip install 'enclavefl\[dp\]'"):
            extras.require_for_job(job, "job.yaml")


def test_commands_without_extras_still_run(hide) -> None:
    hide("torch", "sklearn", "matplotlib")
    result = CliRunner().invoke(main, ["policy", "show", str(EXAMPLES / "policy-sim.json")])
    assert result.exit_code == 0, result.output


def test_a_failed_import_of_an_extra_module_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import enclavefl.jobs.demo

    def broken(work: Path) -> None:
        raise ModuleNotFoundError("No module named 'keras'", name="keras")

    monkeypatch.setattr(enclavefl.jobs.demo, "run_demo", broken)
    result = CliRunner().invoke(main, ["demo", "--work", "unused"])
    assert result.exit_code == 2
    assert "`enclavefl demo` needs [tf]" in result.output and "pip install 'enclavefl[tf]'" in result.output


def test_a_failed_import_of_another_module_stays_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    import enclavefl.jobs.demo

    def broken(work: Path) -> None:
        raise ModuleNotFoundError("No module named 'nonexistent'", name="nonexistent")

    monkeypatch.setattr(enclavefl.jobs.demo, "run_demo", broken)
    result = CliRunner().invoke(main, ["demo", "--work", "unused"])
    assert isinstance(result.exception, ModuleNotFoundError)


def test_require_names_every_missing_extra(hide) -> None:
    hide("torch", "opacus")
    with pytest.raises(extras.MissingExtra) as caught:
        extras.require(["ml", "dp"], needed_for="this test")
    assert caught.value.extras == ("ml", "dp") and caught.value.exit_code == 2
    assert str(caught.value).endswith("install it with: pip install 'enclavefl[ml,dp]'")
