"""Typed errors shared by every layer.

Each error carries a human-readable reason. The CLI maps the two families to exit codes:
`Rejected` (a security check said no) exits 1, `UsageError` (bad or unreadable input)
exits 2. Anything else escaping to the CLI is a bug.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

__all__ = [
    "Check",
    "CollateralError",
    "ConfigError",
    "EnclaveflError",
    "FormatError",
    "JobFailed",
    "KeyBindingRejected",
    "PolicyRejected",
    "PrivacyBudgetExceeded",
    "QuoteRejected",
    "Rejected",
    "SealError",
    "TransportError",
    "UsageError",
]


class Check(StrEnum):
    """Every security check a `Rejected` can name: a closed vocabulary.

    The values travel as they are (CLI `--json` `check` field, gRPC trailing metadata), so a
    member compares equal to its string. docs/errors.md gives each one's cause and fix.
    """

    UNSPECIFIED = "unspecified"
    SIGNATURE = "signature"
    QE_REPORT = "qe-report"
    QE_IDENTITY = "qe-identity"
    COLLATERAL_FORMAT = "collateral-format"
    COLLATERAL_SIGNATURE = "collateral-signature"
    COLLATERAL_MISMATCH = "collateral-mismatch"
    COLLATERAL_EXPIRED = "collateral-expired"
    COLLATERAL_NOT_YET_VALID = "collateral-not-yet-valid"
    CERTIFICATE_CHAIN = "certificate-chain"
    CERTIFICATE_EXPIRED = "certificate-expired"
    REVOKED = "revoked"
    TCB = "tcb"
    TDX_MODULE = "tdx-module"
    VERIFICATION = "verification"
    KEY_BINDING = "key-binding"
    SELF_SIGNATURE = "self-signature"
    CERTIFICATE_VALIDITY = "certificate-validity"
    SIMULATED = "simulated"
    DEBUG = "debug"
    TCB_STATUS = "tcb_status"
    MR_ENCLAVE = "mr_enclave"
    MR_SIGNER = "mr_signer"
    ISV_PROD_ID = "isv_prod_id"
    ISV_SVN = "isv_svn"
    MR_TD = "mr_td"
    RTMR = "rtmr"
    MR_SEAM = "mr_seam"
    MR_SIGNER_SEAM = "mr_signer_seam"
    MR_CONFIG_ID = "mr_config_id"
    MR_OWNER = "mr_owner"
    MR_OWNER_CONFIG = "mr_owner_config"
    PARTY_IDENTITY = "party-identity"
    POLICY_HASH = "policy-hash"
    CLIENT_EVIDENCE = "client-evidence"
    ADMISSION_SIGNATURE = "admission-signature"
    SERVER_CERTIFICATE = "server-certificate"
    JOB_ID = "job-id"
    NONCE = "nonce"
    RATE_LIMIT = "rate-limit"
    SESSION = "session"
    PARTY_NAME = "party-name"
    PARTY_NAME_HELD = "party-name-held"
    PARTY = "party"
    ATTESTATION = "attestation"
    KEY_NAME = "key-name"
    INTEGRITY = "integrity"
    FORMAT = "format"
    ARTIFACT = "artifact"
    VERSION = "version"
    KEY = "key"
    FRESHNESS = "freshness"
    PRIVACY = "privacy"
    VFL_PARTY = "vfl-party"
    VFL_ALIGNMENT = "vfl-alignment"
    VFL_PROTOCOL = "vfl-protocol"
    ALIGN_PEER = "align-peer"
    ALIGN_PROTOCOL = "align-protocol"
    ALIGN_SESSION = "align-session"
    ALIGN_DUPLICATES = "align-duplicates"
    ALIGN_RESULT = "align-result"
    PSI_POINT = "psi-point"
    PSI_RESULT = "psi-result"

    @classmethod
    def from_wire(cls, value: str) -> Check:
        """The check a peer named; UNSPECIFIED for one this version does not know (a newer peer)."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


class EnclaveflError(Exception):
    """Base of every error enclavefl raises on purpose."""

    exit_code = 2

    @property
    def reason(self) -> str:
        return str(self)


class UsageError(EnclaveflError):
    """The input is malformed, missing or unreadable (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file (policy, job, key spec) is invalid; names the bad field."""


class FormatError(UsageError):
    """Bytes that should be a quote, certificate, CBOR evidence or sealed file do not parse."""


class Rejected(EnclaveflError):
    """A security check refused the input (exit 1). `check` names which check (a `Check`).

    A string is accepted for a check's value; one that is not a `Check` raises ValueError (a bug:
    the vocabulary is closed, add the check to `Check` and docs/errors.md).
    """

    exit_code = 1

    def __init__(self, reason: str, *, check: Check | str = Check.UNSPECIFIED, claims: Any = None) -> None:
        super().__init__(reason)
        self.check = Check(check)
        # The verified claims, when the refusal came after the evidence itself checked out
        # (a policy refusal): lets `verify --json` show what the peer is.
        self.claims = claims


class QuoteRejected(Rejected):
    """Hardware evidence failed cryptographic verification (signature, chain, collateral)."""


class PolicyRejected(Rejected):
    """Evidence verified but the claims do not satisfy the policy."""


class PrivacyBudgetExceeded(Rejected):
    """A job's privacy settings could spend more than the policy's budget (check "privacy")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, check=Check.PRIVACY)


class KeyBindingRejected(Rejected):
    """The evidence is not bound to the key that presents it."""


class SealError(Rejected):
    """A sealed file is altered, truncated, for another artifact or version, or the key is wrong."""


class CollateralError(EnclaveflError):
    """Collateral could not be obtained (PCCS unreachable, cache unusable)."""

    exit_code = 2


class TransportError(EnclaveflError):
    """A peer could not be reached or the connection broke."""

    exit_code = 1


class JobFailed(EnclaveflError):
    """A party of a job did not finish (exit 1); the reason names the parties and their logs."""

    exit_code = 1
