"""Trust: evidence, attesters, quote verification, policy and RA-TLS certificates.

The public API of the layer: make evidence (`make_attester`, `make_certificate`), verify it
(`verify_quote`, `check_quote`, `verify_certificate`, `Verdict`) against a `Policy` with
collateral from `collateral_source`, and measure code (`simulated_measurement`,
`read_sigstruct`). `tee` imports no gRPC: the attested channel is `enclavefl.net`.
"""

from enclavefl.tee.attesters import Attester, make_attester
from enclavefl.tee.claims import Claims, TeeType
from enclavefl.tee.collateral import CollateralSource, collateral_source
from enclavefl.tee.measure import Measurement, read_sigstruct, simulated_measurement
from enclavefl.tee.policy import PartyIdentity, Policy, PrivacyBudget, load_policy, read_measurement
from enclavefl.tee.quote import verify_quote
from enclavefl.tee.ratls import RaTlsIdentity, make_certificate, verify_certificate
from enclavefl.tee.verify import Verdict, check_quote

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
