"""Evidence against a policy, as one outcome: a raw quote or an RA-TLS certificate, accepted
with its claims or refused naming the check (with the claims, when only the policy refused)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from enclavefl.errors import Rejected
from enclavefl.tee.claims import Claims
from enclavefl.tee.collateral import CollateralSource
from enclavefl.tee.policy import Policy
from enclavefl.tee.quote import verify_quote

__all__ = ["CLAIM_FIELDS", "Verdict", "check_quote"]

CLAIM_FIELDS = ("tee", "mr_enclave", "mr_signer", "isv_prod_id", "isv_svn", "debug",
                "tcb_status", "advisory_ids", "report_data")  # fmt: skip
"""The claims every verdict reports (None when there are none): `Claims.to_json()`'s SGX keys."""


def check_quote(quote: bytes, *, policy: Policy, collateral: CollateralSource, at: int | None = None) -> Claims:
    """Verify a raw SGX/TDX quote against `collateral` at unix time `at`, then `policy`.

    Returns the claims; raises `Rejected` naming the failed check. A policy refusal carries
    the verified claims (`err.claims`), as `verify_certificate`'s does.
    """
    claims = verify_quote(quote, collateral, at=at)
    try:
        policy.check(claims)
    except Rejected as err:
        err.claims = err.claims or claims
        raise
    return claims


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying evidence: `claims` (None when the evidence itself failed or
    none was seen) and `error` (None when accepted)."""

    claims: Claims | None
    error: Rejected | None = None

    @classmethod
    def of(cls, verify: Callable[[], Claims]) -> Verdict:
        """Run `verify`; a refusal becomes the verdict (with its claims), other errors propagate."""
        try:
            return cls(verify())
        except Rejected as err:
            return cls(err.claims, err)

    @property
    def accepted(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """accepted, reason, check, then the claims (each None when there are none)."""
        out: dict[str, Any] = {
            "accepted": self.error is None,
            "reason": self.error.reason if self.error else None,
            "check": self.error.check if self.error else None,
        }
        if self.claims is not None:
            out.update(self.claims.to_json())
        else:
            out.update(dict.fromkeys(CLAIM_FIELDS))
        return out
