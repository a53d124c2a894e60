"""What must never be used unknowingly, in one namespace (as pyca/cryptography's `hazmat`).

* `SimulatedAttester`: evidence without a TEE; anyone can forge it. Peers accept it only
  when their policy sets `allow_simulated` (and log INSECURE on every connection).
* `FileKeySource`, `create_key_file`: a `file:` key on the host's disk; whoever reads the
  file unseals every checkpoint. For development.
* `VERIFY_SERVER_ONLY`, `VERIFY_CLIENT_ONLY`: one-way attestation modes (job files:
  `tee.verify: server|client`): one side of every channel is not attested at all.

Importing from here states the intent; the old places (`enclavefl.seal.FileKeySource`,
`enclavefl.seal.create_key_file`) still work for one release with a DeprecationWarning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from enclavefl.seal.keys import FileKeySource, create_key_file

if TYPE_CHECKING:
    from enclavefl.net.admission import Mode
    from enclavefl.tee.attesters import SimulatedAttester

    VERIFY_SERVER_ONLY: Mode
    VERIFY_CLIENT_ONLY: Mode

__all__ = ["VERIFY_CLIENT_ONLY", "VERIFY_SERVER_ONLY", "FileKeySource", "SimulatedAttester", "create_key_file"]

# Loaded on first use: `enclavefl keygen` needs only the key file, not the network stack.
# VERIFY_SERVER_ONLY: only the server (coordinator) is attested, its clients are not;
# VERIFY_CLIENT_ONLY: only the clients are attested, the server is not.
_LAZY = {
    "SimulatedAttester": ("enclavefl.tee.attesters", "SimulatedAttester"),
    "VERIFY_SERVER_ONLY": ("enclavefl.net.admission", "Mode.SERVER"),
    "VERIFY_CLIENT_ONLY": ("enclavefl.net.admission", "Mode.CLIENT"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'enclavefl.insecure' has no attribute {name!r}")
    module, path = _LAZY[name]
    value: Any = importlib.import_module(module)
    for attribute in path.split("."):
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
