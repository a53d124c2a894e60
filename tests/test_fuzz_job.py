"""Fuzzing job files: whatever the text, loading ends in a ConfigError/UsageError naming the
problem, or in a job; a mutation that leaves the YAML document unchanged loads the same job."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from conftest import REPO, fuzz_settings, shared_file
from hypothesis import given
from hypothesis import strategies as st

from enclavefl.errors import UsageError
from enclavefl.jobs.config import load_job

EXAMPLES = REPO / "examples"


def _example(name: str) -> str:
    """The example job with absolute paths, so it loads from any directory."""
    data = str(shared_file("tabular").parent)
    text = (EXAMPLES / name).read_text()
    text = text.replace("${ENCLAVEFL_SHARED_DATA:-../../shared/data}", data)
    return text.replace("policy: policy-sim.json", f"policy: {EXAMPLES / 'policy-sim.json'}")


def _load(text: str) -> Any:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            return load_job(path)
        except UsageError as exc:  # ConfigError is one
            assert exc.reason
            return exc


JOBS = st.sampled_from(["hfl_default_credit.yaml", "vfl_breast.yaml"])
SCALARS = st.one_of(
    st.sampled_from(
        ["true", "1e30", ".inf", "-1", "0", "x", "null", "[]", "{}", "&a [*a]", "!!python/object:os.system"]
    ),
    st.text(max_size=12),
)


@fuzz_settings(30)
@given(name=JOBS, line=st.integers(min_value=0), value=SCALARS, cut=st.booleans())
def test_mutated_job_file_is_a_typed_error_or_a_job(name: str, line: int, value: str, cut: bool) -> None:
    original = _example(name)
    lines = original.splitlines()
    index = line % len(lines)
    if cut:
        lines = lines[:index]
    elif ":" in lines[index]:
        key = lines[index].split(":", 1)[0]
        lines[index] = f"{key}: {value}"
    else:
        lines[index] = value
    text = "\n".join(lines) + "\n"
    outcome = _load(text)
    if isinstance(outcome, UsageError):
        return
    try:
        same = yaml.safe_load(text) == yaml.safe_load(original)
    except yaml.YAMLError:
        same = False
    if same:
        assert outcome == _load(original)


@fuzz_settings(30)
@given(data=st.binary(max_size=300))
def test_random_bytes_as_a_job_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_bytes(data)
        try:
            load_job(path)
        except UsageError as exc:
            assert exc.reason


def test_job_mode_that_is_not_a_string_is_a_config_error() -> None:
    """Found by the fuzz test above: `mode: []` raised TypeError (unhashable list)."""
    for value in ("[]", "{a: 1}", "[hfl]"):
        text = _example("vfl_breast.yaml").replace("  mode: vfl", f"  mode: {value}")
        outcome = _load(text)
        assert isinstance(outcome, UsageError) and "job.mode" in outcome.reason
