"""Data at rest: sealed (encrypted, authenticated) files and the key sources behind them."""

import warnings
from typing import Any

from enclavefl.seal.keys import (
    KeySource,
    SgxSealKeySource,
    ensure_development_key,
    known_key_schemes,
    parse_key_spec,
    register_key_scheme,
)
from enclavefl.seal.sealed import (
    SealedHeader,
    read_header,
    read_sealed,
    seal_file,
    unseal_file,
    write_sealed,
)

__all__ = [
    "KeySource",
    "SealedHeader",
    "SgxSealKeySource",
    "ensure_development_key",
    "known_key_schemes",
    "parse_key_spec",
    "read_header",
    "read_sealed",
    "register_key_scheme",
    "seal_file",
    "unseal_file",
    "write_sealed",
]

_MOVED = {"FileKeySource", "create_key_file"}


def __getattr__(name: str) -> Any:
    # Insecure development keys moved to enclavefl.insecure; the old names work for one release.
    if name in _MOVED:
        warnings.warn(
            f"enclavefl.seal.{name} is deprecated: import it from enclavefl.insecure (file: keys are insecure)",
            DeprecationWarning,
            stacklevel=2,
        )
        from enclavefl.seal import keys

        return getattr(keys, name)
    raise AttributeError(f"module 'enclavefl.seal' has no attribute {name!r}")
