"""Data at rest: sealed (encrypted, authenticated) files and the key sources behind them."""

from enclavefl.seal.keys import (
    FileKeySource,
    KeySource,
    SgxSealKeySource,
    create_key_file,
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
    "FileKeySource",
    "KeySource",
    "SealedHeader",
    "SgxSealKeySource",
    "create_key_file",
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
