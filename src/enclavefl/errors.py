"""Typed errors shared by every layer.

Each error carries a human-readable reason. The CLI maps the two families to exit codes:
`Rejected` (a security check said no) exits 1, `UsageError` (bad or unreadable input)
exits 2. Anything else escaping to the CLI is a bug.
"""

from __future__ import annotations

from typing import Any


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
    """A security check refused the input (exit 1). `check` names which check."""

    exit_code = 1

    def __init__(self, reason: str, *, check: str = "unspecified", claims: Any = None) -> None:
        super().__init__(reason)
        self.check = check
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
        super().__init__(reason, check="privacy")


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
