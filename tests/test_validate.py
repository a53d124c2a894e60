"""enclavefl.validate: a bool is neither an int nor a number, whatever Python's subclassing says."""

from __future__ import annotations

import math

import numpy as np
import pytest

from enclavefl.validate import is_int, is_number


@pytest.mark.parametrize("value", [0, -3, 2**70])
def test_ints_are_ints_and_numbers(value: int) -> None:
    assert is_int(value)
    assert is_number(value)


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, np.int64(1), [1]])
def test_is_int_refuses_bools_floats_strings_and_numpy_scalars(value: object) -> None:
    assert not is_int(value)


@pytest.mark.parametrize("value", [0.5, math.inf, math.nan, np.float64(2.5)])
def test_floats_are_numbers_finite_or_not(value: float) -> None:
    assert is_number(value)
    assert not is_int(value)


@pytest.mark.parametrize("value", [True, False, "1.5", None, 1j])
def test_is_number_refuses_bools_strings_and_complex(value: object) -> None:
    assert not is_number(value)
