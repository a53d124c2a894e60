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

from enclavefl.net.admission import Mode
from enclavefl.seal.keys import FileKeySource, create_key_file
from enclavefl.tee.attesters import SimulatedAttester

__all__ = ["VERIFY_CLIENT_ONLY", "VERIFY_SERVER_ONLY", "FileKeySource", "SimulatedAttester", "create_key_file"]

VERIFY_SERVER_ONLY = Mode.SERVER
"""Only the server (coordinator) is attested; its clients are not."""
VERIFY_CLIENT_ONLY = Mode.CLIENT
"""Only the clients are attested; the server is not."""
