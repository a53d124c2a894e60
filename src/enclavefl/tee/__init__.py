"""Trust: evidence, attesters, quote verification, policy and RA-TLS certificates.

The public API of the layer: make evidence (`make_attester`, `make_certificate`), verify it
(`verify_quote`, `check_quote`, `verify_certificate`, `Verdict`) against a `Policy` with
collateral from `collateral_source`, and measure code (`simulated_measurement`,
`read_sigstruct`). `tee` imports no gRPC: the attested channel is `enclavefl.net`.

Names load on first use, so that a command that only measures or writes a policy does not
import quote verification and X.509 (the CLI's start-up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from enclavefl.lazy import lazy_exports

if TYPE_CHECKING:
    from enclavefl.tee.attesters import Attester, make_attester
    from enclavefl.tee.claims import Claims, TeeType
    from enclavefl.tee.collateral import CollateralSource, collateral_source
    from enclavefl.tee.measure import Measurement, read_sigstruct, simulated_measurement
    from enclavefl.tee.policy import PartyIdentity, Policy, PrivacyBudget, load_policy, read_measurement
    from enclavefl.tee.quote import verify_quote
    from enclavefl.tee.ratls import RaTlsIdentity, make_certificate, verify_certificate
    from enclavefl.tee.verify import Verdict, check_quote

_EXPORTS = {
    "Attester": "enclavefl.tee.attesters",
    "make_attester": "enclavefl.tee.attesters",
    "Claims": "enclavefl.tee.claims",
    "TeeType": "enclavefl.tee.claims",
    "CollateralSource": "enclavefl.tee.collateral",
    "collateral_source": "enclavefl.tee.collateral",
    "Measurement": "enclavefl.tee.measure",
    "read_sigstruct": "enclavefl.tee.measure",
    "simulated_measurement": "enclavefl.tee.measure",
    "PartyIdentity": "enclavefl.tee.policy",
    "Policy": "enclavefl.tee.policy",
    "PrivacyBudget": "enclavefl.tee.policy",
    "load_policy": "enclavefl.tee.policy",
    "read_measurement": "enclavefl.tee.policy",
    "verify_quote": "enclavefl.tee.quote",
    "RaTlsIdentity": "enclavefl.tee.ratls",
    "make_certificate": "enclavefl.tee.ratls",
    "verify_certificate": "enclavefl.tee.ratls",
    "Verdict": "enclavefl.tee.verify",
    "check_quote": "enclavefl.tee.verify",
}

__all__ = [
    "Attester",
    "Claims",
    "CollateralSource",
    "Measurement",
    "PartyIdentity",
    "Policy",
    "PrivacyBudget",
    "RaTlsIdentity",
    "TeeType",
    "Verdict",
    "check_quote",
    "collateral_source",
    "load_policy",
    "make_attester",
    "make_certificate",
    "read_measurement",
    "read_sigstruct",
    "simulated_measurement",
    "verify_certificate",
    "verify_quote",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
