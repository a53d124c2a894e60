"""What verified evidence says about a party: its measurements, TCB state and bound data."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Claims", "TeeType"]


class TeeType(str, Enum):
    SGX = "sgx"
    TDX = "tdx"
    SIMULATED = "simulated"


@dataclass(frozen=True)
class Claims:
    """Claims of one piece of evidence, after its signature and collateral were checked.

    For SGX (and simulated) the identity is mr_enclave/mr_signer/isv_prod_id/isv_svn. For
    TDX it is mr_td and the four RTMRs; mr_enclave/mr_signer then stay empty.
    """

    tee: TeeType
    report_data: bytes
    tcb_status: str
    advisory_ids: tuple[str, ...] = ()
    mr_enclave: bytes = b""
    mr_signer: bytes = b""
    isv_prod_id: int = 0
    isv_svn: int = 0
    debug: bool = False
    mr_td: bytes = b""
    rtmrs: tuple[bytes, ...] = ()
    # TDX: the TDX module's identity and the TD's owner-defined fields (CCZoo's TDX policy keys).
    mr_seam: bytes = b""
    mr_signer_seam: bytes = b""
    mr_config_id: bytes = b""
    mr_owner: bytes = b""
    mr_owner_config: bytes = b""
    # Claims bound by report_data but carried beside the quote (RA-TLS tagged evidence):
    # e.g. {"pubkey-hash": [1, b"..."], "policy-hash": b"..."}.
    bound: dict[str, Any] = field(default_factory=dict)

    @property
    def insecure(self) -> bool:
        return self.tee is TeeType.SIMULATED

    def short_id(self) -> str:
        """A short identity for log lines (never secret)."""
        ident = self.mr_enclave or self.mr_td
        return ident.hex()[:12] if ident else "-"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tee": self.tee.value,
            "mr_enclave": self.mr_enclave.hex(),
            "mr_signer": self.mr_signer.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "debug": self.debug,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "report_data": self.report_data.hex(),
        }
        if self.tee is TeeType.TDX:
            out["mr_td"] = self.mr_td.hex()
            out["rtmrs"] = [r.hex() for r in self.rtmrs]
            for name in ("mr_seam", "mr_signer_seam", "mr_config_id", "mr_owner", "mr_owner_config"):
                out[name] = getattr(self, name).hex()
        return out
