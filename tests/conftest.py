"""Shared fixtures: where the shared test data lives, and a pinned verification clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ENCLAVEFL_SHARED_DATA", REPO.parent / "shared" / "data"))

# Both sample quotes verify offline at this unix time (their collateral is valid then).
PINNED_TIME = 1751328000


def shared_file(*parts: str) -> Path:
    """Path of a file in ../shared/data; skips the test with a clear message when absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (clone with ../shared beside the repo)")
    return path


@pytest.fixture
def attestation_dir() -> Path:
    return shared_file("attestation")


@pytest.fixture
def tabular_dir() -> Path:
    return shared_file("tabular")
