"""Type checks of decoded values that every layer shares: job files, message metadata, user arguments.

`bool` is a subclass of `int`, so `isinstance(True, int)` holds and a `true` in a YAML job
file or a JSON message would pass as the number 1. These predicates mean "a real int" and
"a real number", and narrow the type for mypy; each caller raises its own typed error
(enclavefl.errors) with its own message, since the message names the field and the fix.
"""

from __future__ import annotations

from typing import TypeGuard

__all__ = ["is_int", "is_number"]


def is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """An int or a float that is not a bool (NaN and infinities included: check finiteness apart)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
