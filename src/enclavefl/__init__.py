"""enclavefl: confidential federated learning between mutually attested TEEs."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    # One source of truth: the version pyproject.toml gives the installed distribution.
    __version__ = version("enclavefl")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
