"""Which peers to trust: a superset of Intel CCZoo's `dynamic_config.json`.

A CCZoo file loads unchanged::

    {"verify_mr_enclave": "on", "verify_mr_signer": "on",
     "verify_isv_prod_id": "on", "verify_isv_svn": "on",
     "sgx_mrs": [{"mr_enclave": "<64 hex>", "mr_signer": "<64 hex>",
                  "isv_prod_id": "0", "isv_svn": "0"}]}

An SGX peer passes if ANY `sgx_mrs` entry matches ALL enabled fields; `isv_svn` is a minimum
(as in Gramine; CCZoo's C++ compares it for equality). Added keys: `tdx_mrs` (entries of
`mr_td`, `rtmr0`..`rtmr3`; omitted fields are not checked), `allowed_tcb_status` (default
["UpToDate"]), `allow_debug` and `allow_simulated` (both default false), and `privacy`
(`{unit: record|worker|label, max_epsilon, delta}`: the differential-privacy budget every
party of a job enforces; being part of the digest, it is what every peer attests to), and
`parties` (`{party name: {sgx_mrs: [...], tdx_mrs: [...]}}`: what a party of that name must
run, on top of the rest; a name not listed is held to the rest only). A `verify_*` key
that is absent is "on" when some `sgx_mrs` entry gives that field, else "off". Unknown keys
are errors, so that a typo cannot silently loosen a policy.

CCZoo's other forms load unchanged too. SGX: `verify_enclave_debuggable` with a
`debuggable` flag per `sgx_mrs` entry (when on, a peer's debug attribute must equal the
matching entry's; an entry with `"debuggable": true` is an explicit opt-in to debug
enclaves), and `verify_in_enclave` (where CCZoo runs the quote verification; an enclavefl
party always verifies in its own process, inside its TEE, so it changes nothing). TDX: the
`verify_mr_seam`, `verify_mrsigner_seam`, `verify_mr_td`, `verify_mr_config_id`,
`verify_mr_owner`, `verify_mr_owner_config`, `verify_rt_mr0`..`verify_rt_mr3` switches and
`tdx_mrs` entries spelled `mrsigner_seam`, `rt_mr0`.. : a field switched off is dropped
from the entries, one switched on must be given in every entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from enclavefl.fsutil import atomic_write_bytes
from enclavefl.errors import Check, ConfigError, PolicyRejected, UsageError
from enclavefl.tee.claims import Claims, TeeType
from enclavefl.validate import is_int

__all__ = [
    "PRIVACY_UNITS",
    "TCB_STATUSES",
    "PartyIdentity",
    "Policy",
    "PrivacyBudget",
    "SgxIdentity",
    "TdxIdentity",
    "load_policy",
    "read_measurement",
]

log = logging.getLogger(__name__)

# Statuses dcap-qvl reports for a verified quote. "Revoked" is never acceptable.
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)
SGX_FIELDS = ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn")
TDX_FIELDS = (
    "mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3",
    "mr_seam", "mr_signer_seam", "mr_config_id", "mr_owner", "mr_owner_config",
)  # fmt: skip
# CCZoo's TDX dynamic_config.json spelling of each TDX field (entry key; switch verify_<key>).
_CCZOO_TDX_NAMES = {
    "mr_td": "mr_td", "rt_mr0": "rtmr0", "rt_mr1": "rtmr1", "rt_mr2": "rtmr2", "rt_mr3": "rtmr3",
    "mr_seam": "mr_seam", "mrsigner_seam": "mr_signer_seam", "mr_config_id": "mr_config_id",
    "mr_owner": "mr_owner", "mr_owner_config": "mr_owner_config",
}  # fmt: skip
_CANONICAL_TAG = "enclavefl-policy/1"
_RA_TLS_VARIABLES = {
    "mr_enclave": "RA_TLS_MRENCLAVE",
    "mr_signer": "RA_TLS_MRSIGNER",
    "isv_prod_id": "RA_TLS_ISV_PROD_ID",
    "isv_svn": "RA_TLS_ISV_SVN",
}


def _parse_hex(value: Any, size: int) -> str | None:
    """Lower-case hex of exactly `size` bytes; "" and None mean "not given"."""
    if value is None or value in {"", b""}:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).hex()
    if not isinstance(value, str):
        raise ValueError(f"must be a hex string, got {type(value).__name__}")
    if not re.fullmatch(f"[0-9a-fA-F]{{{2 * size}}}", value):
        raise ValueError(f"must be {2 * size} hex characters ({size} bytes), got {value[:80]!r}")
    return value.lower()


def _parse_u16(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,5}\s*", value):
        value = int(value)
    if not is_int(value):
        raise ValueError(f"must be an integer 0..65535 (or its decimal string), got {value!r}")
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"must be within 0..65535, got {value}")
    return value


Hex32 = Annotated[str | None, BeforeValidator(lambda v: _parse_hex(v, 32))]
Hex48 = Annotated[str | None, BeforeValidator(lambda v: _parse_hex(v, 48))]
U16 = Annotated[int | None, BeforeValidator(_parse_u16)]
OnOff = Literal["on", "off"]


def _tcb_status(value: Any) -> str:
    if value == "Revoked":
        raise ValueError("Revoked can never be allowed")
    if value not in TCB_STATUSES:
        raise ValueError(f"unknown TCB status {value!r} (known: {', '.join(TCB_STATUSES)})")
    return value  # type: ignore[no-any-return]


TcbStatus = Annotated[str, BeforeValidator(_tcb_status)]


class SgxIdentity(BaseModel):
    """One allowed SGX identity (a CCZoo `sgx_mrs` entry). `isv_svn` is a minimum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mr_enclave: Hex32 = None
    mr_signer: Hex32 = None
    isv_prod_id: U16 = None
    isv_svn: U16 = None
    debuggable: StrictBool | None = None
    """Checked only with verify_enclave_debuggable on: the peer's debug attribute must equal it."""


class TdxIdentity(BaseModel):
    """One allowed TDX identity; a field left out is not checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mr_td: Hex48 = None
    rtmr0: Hex48 = None
    rtmr1: Hex48 = None
    rtmr2: Hex48 = None
    rtmr3: Hex48 = None
    mr_seam: Hex48 = None
    mr_signer_seam: Hex48 = None
    mr_config_id: Hex48 = None
    mr_owner: Hex48 = None
    mr_owner_config: Hex48 = None

    @model_validator(mode="after")
    def _pins_something(self) -> TdxIdentity:
        if all(getattr(self, name) is None for name in TDX_FIELDS):
            raise ValueError(f"a tdx_mrs entry must give at least one of {', '.join(TDX_FIELDS)}")
        return self


PRIVACY_UNITS = ("record", "worker", "label")


class PrivacyBudget(BaseModel):
    """A differential-privacy budget: (`max_epsilon`, `delta`)-DP for one `unit` of privacy.

    record: each training row of each worker (DP-SGD in the workers); worker: everything one
    worker contributes (clipped, noised aggregation at the parameter server); label: the
    vertical leader's labels (randomized response). `delta` may be 0 only for label DP,
    whose randomized response is pure epsilon-DP; Gaussian mechanisms need delta > 0.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: Literal["record", "worker", "label"]
    max_epsilon: float
    delta: float

    @field_validator("max_epsilon")
    @classmethod
    def _positive_finite(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"must be a finite number > 0, got {value}")
        return float(value)

    @field_validator("delta")
    @classmethod
    def _probability(cls, value: float) -> float:
        if not (math.isfinite(value) and 0 <= value < 1):
            raise ValueError(f"must be within [0, 1), got {value}")
        return float(value)

    @model_validator(mode="after")
    def _delta_for_gaussian(self) -> PrivacyBudget:
        if self.unit != "label" and self.delta == 0:
            raise ValueError(f"delta must be > 0 for unit {self.unit} (the Gaussian mechanism is not pure epsilon-DP)")
        return self

    def describe(self) -> str:
        return f"{self.unit}-level epsilon <= {self.max_epsilon:g}, delta = {self.delta:g}"

    def canonical(self) -> dict[str, Any]:
        return {"unit": self.unit, "max_epsilon": self.max_epsilon, "delta": self.delta}


MAX_PARTY_NAME_CHARS = 128


class PartyIdentity(BaseModel):
    """What a party of one name must run (a `parties` entry): any of its identities, each
    matching on every field it gives (`isv_svn` a minimum)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sgx_mrs: tuple[SgxIdentity, ...] = ()
    tdx_mrs: tuple[TdxIdentity, ...] = ()

    @model_validator(mode="after")
    def _pins_something(self) -> PartyIdentity:
        if not self.sgx_mrs and not self.tdx_mrs:
            raise ValueError("a parties entry must list sgx_mrs or tdx_mrs")
        for index, entry in enumerate(self.sgx_mrs):
            if all(getattr(entry, name) is None for name in SGX_FIELDS):
                raise ValueError(f"sgx_mrs[{index}] must give at least one of {', '.join(SGX_FIELDS)}")
        return self

    def matches(self, claims: Claims) -> bool:
        if claims.tee is TeeType.TDX:
            measured = dict(zip(TDX_FIELDS, (claims.mr_td, *claims.rtmrs), strict=False))
            return any(
                all(getattr(e, n) is None or getattr(e, n) == measured.get(n, b"").hex() for n in TDX_FIELDS)
                for e in self.tdx_mrs
            )
        return any(_sgx_entry_matches(e, claims) for e in self.sgx_mrs)

    def canonical(self) -> dict[str, Any]:
        def entries(items: tuple[BaseModel, ...]) -> list[Any]:
            unique = {json.dumps(e.model_dump(exclude_none=True), sort_keys=True) for e in items}
            return [json.loads(e) for e in sorted(unique)]

        return {"sgx_mrs": entries(self.sgx_mrs), "tdx_mrs": entries(self.tdx_mrs)}


def _sgx_entry_matches(entry: SgxIdentity, claims: Claims) -> bool:
    for name in SGX_FIELDS:
        want = getattr(entry, name)
        if want is None:
            continue
        got = getattr(claims, name)
        if name == "isv_svn":
            if got < want:
                return False
        elif (got.hex() if isinstance(got, bytes) else got) != want:
            return False
    return True


def _party_names(value: Any) -> Any:
    if isinstance(value, Mapping):
        for name in value:
            if not isinstance(name, str) or not name or len(name) > MAX_PARTY_NAME_CHARS or not name.isprintable():
                raise ValueError(f"party names must be 1..{MAX_PARTY_NAME_CHARS} printable characters, got {name!r}")
    return value


class Policy(BaseModel):
    """Identity, TCB and debug requirements every peer's claims must satisfy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    verify_mr_enclave: OnOff = "off"
    verify_mr_signer: OnOff = "off"
    verify_isv_prod_id: OnOff = "off"
    verify_isv_svn: OnOff = "off"
    verify_enclave_debuggable: OnOff = "off"
    verify_in_enclave: OnOff | None = None
    """CCZoo: verify quotes inside the enclave. An enclavefl party always does; kept for round trips."""
    sgx_mrs: tuple[SgxIdentity, ...] = ()
    tdx_mrs: tuple[TdxIdentity, ...] = ()
    allowed_tcb_status: tuple[TcbStatus, ...] = ("UpToDate",)
    allow_debug: StrictBool = False
    allow_simulated: StrictBool = False
    privacy: PrivacyBudget | None = None
    parties: Annotated[dict[str, PartyIdentity], BeforeValidator(_party_names)] = {}

    @model_validator(mode="before")
    @classmethod
    def _cczoo_tdx_form(cls, data: Any) -> Any:
        """CCZoo's TDX switches and spellings -> tdx_mrs entries holding the enabled fields."""
        if not isinstance(data, Mapping):
            return data
        switches = {key: data[f"verify_{key}"] for key in _CCZOO_TDX_NAMES if f"verify_{key}" in data}
        entries = data.get("tdx_mrs")
        spelled = isinstance(entries, (list, tuple)) and any(
            isinstance(e, Mapping) and any(k in e and k != v for k, v in _CCZOO_TDX_NAMES.items()) for e in entries
        )
        if not switches and not spelled:
            return data
        for key, value in switches.items():
            if value not in ("on", "off"):
                raise ValueError(f"verify_{key}: must be 'on' or 'off', got {value!r}")
        converted = {k: v for k, v in data.items() if not (k.startswith("verify_") and k[7:] in switches)}
        if isinstance(entries, (list, tuple)):
            rows = []
            for index, entry in enumerate(entries):
                if not isinstance(entry, Mapping):
                    rows.append(entry)
                    continue
                row: dict[str, Any] = {}
                for key, value in entry.items():
                    name = _CCZOO_TDX_NAMES.get(key, key)
                    # Without any switch (our own spelling), every given field is checked.
                    enabled = switches.get(key, "on" if not switches else "off") == "on"
                    if key in _CCZOO_TDX_NAMES and not enabled:
                        continue
                    if key in _CCZOO_TDX_NAMES and value in (None, ""):
                        raise ValueError(f"tdx_mrs[{index}].{key} is empty but verify_{key} is on")
                    row[name] = value  # type: ignore[index]
                rows.append(row)
            converted["tdx_mrs"] = rows
        return converted

    @model_validator(mode="before")
    @classmethod
    def _default_verify_flags(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        entries = data.get("sgx_mrs")
        entries = entries if isinstance(entries, (list, tuple)) else []
        filled = dict(data)
        for name in (*SGX_FIELDS, "enclave_debuggable"):
            if f"verify_{name}" not in filled:
                field = "debuggable" if name == "enclave_debuggable" else name
                given = any(
                    isinstance(e, Mapping) and e.get(field) not in (None, "") for e in entries
                )
                filled[f"verify_{name}"] = "on" if given else "off"
        return filled

    @model_validator(mode="after")
    def _entries_give_enabled_fields(self) -> Policy:
        for name in self.enabled_sgx_fields:
            for index, entry in enumerate(self.sgx_mrs):
                if getattr(entry, name) is None:
                    raise ValueError(f"sgx_mrs[{index}].{name} is empty but verify_{name} is on")
        if self.verify_enclave_debuggable == "on":
            for index, entry in enumerate(self.sgx_mrs):
                if entry.debuggable is None:
                    raise ValueError(f"sgx_mrs[{index}].debuggable is empty but verify_enclave_debuggable is on")
        return self

    # -- construction -------------------------------------------------------------------

    @classmethod
    def default(cls) -> Policy:
        """Identity not pinned, UpToDate TCB only, no debug, no simulated evidence."""
        return cls()

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Policy:
        if not isinstance(obj, Mapping):
            raise ConfigError(f"a policy must be a JSON object, got {type(obj).__name__}")
        try:
            return cls.model_validate(dict(obj))
        except ValidationError as exc:
            raise ConfigError(f"invalid policy: {_describe(exc)}") from None
        except RecursionError:
            raise ConfigError("invalid policy: nested too deeply") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read policy {file}: {exc}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"policy {file} is not valid JSON: {_json_problem(text, exc)}") from None
        except ValueError as exc:
            raise ConfigError(f"policy {file} is not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(f"policy {file} is not valid JSON: nested too deeply") from None
        try:
            return cls.from_json(obj)
        except ConfigError as exc:
            raise ConfigError(f"policy {file}: {exc}") from None

    @classmethod
    def from_values(
        cls,
        *,
        mr_enclave: str | bytes | None = None,
        mr_signer: str | bytes | None = None,
        isv_prod_id: int | None = None,
        isv_svn: int | None = None,
        allowed_tcb_status: tuple[str, ...] | list[str] = ("UpToDate",),
        allow_debug: bool = False,
        allow_simulated: bool = False,
        privacy: Mapping[str, Any] | None = None,
    ) -> Policy:
        """A policy pinning the given SGX fields (None: not checked); `isv_svn` is a minimum."""
        given = {"mr_enclave": mr_enclave, "mr_signer": mr_signer,
                 "isv_prod_id": isv_prod_id, "isv_svn": isv_svn}  # fmt: skip
        pinned = {name: value for name, value in given.items() if value is not None}
        return cls.from_identities(
            [pinned] if pinned else [],
            allowed_tcb_status=allowed_tcb_status,
            allow_debug=allow_debug,
            allow_simulated=allow_simulated,
            privacy=privacy,
        )

    @classmethod
    def from_identities(
        cls,
        identities: Sequence[Mapping[str, Any]],
        *,
        allowed_tcb_status: tuple[str, ...] | list[str] = ("UpToDate",),
        allow_debug: bool = False,
        allow_simulated: bool = False,
        privacy: Mapping[str, Any] | None = None,
    ) -> Policy:
        """A policy allowing any of several SGX identities (e.g. `enclavefl measure --json`
        outputs). A field is verified when any identity gives it, so every identity must."""
        entries = [dict(identity) for identity in identities]
        obj: dict[str, Any] = {}
        for name in SGX_FIELDS:
            present = [name in entry for entry in entries]
            if any(present) and not all(present):
                raise ConfigError(f"sgx_mrs: {name} is pinned in some identities but not in others")
            obj[f"verify_{name}"] = "on" if entries and all(present) else "off"
        obj["sgx_mrs"] = entries
        obj["allowed_tcb_status"] = list(allowed_tcb_status)
        obj["allow_debug"] = allow_debug
        obj["allow_simulated"] = allow_simulated
        if privacy is not None:
            obj["privacy"] = dict(privacy)
        return cls.from_json(obj)

    @classmethod
    def from_measurements(
        cls,
        measurements: Sequence[Mapping[str, Any]],
        *,
        mr_signer: str | bytes | None = None,
        isv_prod_id: int | None = None,
        isv_svn: int | None = None,
        allowed_tcb_status: tuple[str, ...] | list[str] = ("UpToDate",),
        allow_debug: bool = False,
        allow_simulated: bool = False,
        privacy: Mapping[str, Any] | None = None,
    ) -> Policy:
        """A policy allowing any of `measurements` (as `enclavefl measure --json` writes them,
        or just `{"mr_enclave": hex}`), each with the SGX fields given here pinned over it.
        With no measurements, a policy pinning just the fields given here."""
        given = {"mr_signer": mr_signer, "isv_prod_id": isv_prod_id, "isv_svn": isv_svn}
        overrides = {name: value for name, value in given.items() if value is not None}
        identities = [{**entry, **overrides} for entry in measurements] or ([overrides] if overrides else [])
        return cls.from_identities(
            identities,
            allowed_tcb_status=allowed_tcb_status,
            allow_debug=allow_debug,
            allow_simulated=allow_simulated,
            privacy=privacy,
        )

    @classmethod
    def from_ra_tls_env(cls, environ: Mapping[str, str]) -> Policy:
        """A policy from Gramine's RA-TLS variables, with Gramine's semantics.

        RA_TLS_MRENCLAVE, RA_TLS_MRSIGNER (hex), RA_TLS_ISV_PROD_ID, RA_TLS_ISV_SVN (decimal;
        ISV_SVN is a minimum) must all be set; "any" skips that check. RA_TLS_ALLOW_*=1 widens
        the TCB statuses: HW_CONFIG_NEEDED -> ConfigurationNeeded, OUTDATED_TCB_INSECURE ->
        OutOfDate (with HW_CONFIG_NEEDED also OutOfDateConfigurationNeeded),
        SW_HARDENING_NEEDED -> SWHardeningNeeded (with HW_CONFIG_NEEDED also
        ConfigurationAndSWHardeningNeeded); DEBUG_ENCLAVE_INSECURE=1 allows debug enclaves.
        """
        pinned: dict[str, Any] = {}
        for name, variable in _RA_TLS_VARIABLES.items():
            value = environ.get(variable)
            if value is None:
                raise ConfigError(f"{variable} is not set (set it to 'any' to accept any value)")
            if value == "any":
                continue
            try:
                pinned[name] = (
                    _parse_u16(value) if name.startswith("isv") else _parse_hex(value, 32)
                )
            except ValueError as exc:
                raise ConfigError(f"{variable}: {exc}") from None
        if "mr_enclave" not in pinned and "mr_signer" not in pinned:
            log.warning("neither RA_TLS_MRENCLAVE nor RA_TLS_MRSIGNER is set: any enclave passes")

        def allowed(name: str) -> bool:
            return environ.get(f"RA_TLS_ALLOW_{name}") == "1"

        hw = allowed("HW_CONFIG_NEEDED")
        outdated = allowed("OUTDATED_TCB_INSECURE")
        sw = allowed("SW_HARDENING_NEEDED")
        statuses = [
            status
            for status, ok in (
                ("UpToDate", True),
                ("ConfigurationNeeded", hw),
                ("OutOfDate", outdated),
                ("OutOfDateConfigurationNeeded", outdated and hw),
                ("SWHardeningNeeded", sw),
                ("ConfigurationAndSWHardeningNeeded", hw and sw),
            )
            if ok
        ]
        return cls.from_values(
            **pinned,
            allowed_tcb_status=statuses,
            allow_debug=allowed("DEBUG_ENCLAVE_INSECURE"),
        )

    # -- use ------------------------------------------------------------------------------

    @property
    def enabled_sgx_fields(self) -> tuple[str, ...]:
        return tuple(name for name in SGX_FIELDS if getattr(self, f"verify_{name}") == "on")

    @property
    def _debug_entries(self) -> bool:
        """Some sgx_mrs entry opts in to debug enclaves (CCZoo's verify_enclave_debuggable)."""
        return self.verify_enclave_debuggable == "on" and any(e.debuggable for e in self.sgx_mrs)

    def check(self, claims: Claims) -> None:
        """Raise PolicyRejected (with `check` naming the failed check) unless `claims` pass."""
        if claims.tee is TeeType.SIMULATED:
            if not self.allow_simulated:
                raise PolicyRejected("simulated evidence not allowed by policy", check=Check.SIMULATED)
        elif claims.tcb_status not in self.allowed_tcb_status:
            allowed = ", ".join(self.allowed_tcb_status) or "none"
            raise PolicyRejected(
                f"TCB status {claims.tcb_status} not allowed (allowed: {allowed})",
                check=Check.TCB_STATUS,
            )
        debug_by_entry = claims.tee is not TeeType.TDX and self._debug_entries
        if claims.debug and not self.allow_debug and not debug_by_entry:
            what = "debug TD" if claims.tee is TeeType.TDX else "debug enclave"
            raise PolicyRejected(f"{what} not allowed by policy", check=Check.DEBUG)
        if claims.tee is TeeType.TDX:
            self._check_tdx(claims)
        else:
            self._check_sgx(claims)

    def check_party(self, party: str, claims: Claims) -> None:
        """Raise PolicyRejected(check="party-identity") unless `claims` are what the policy's
        `parties` entry for `party` allows (a party not listed passes: `check` applies)."""
        pin = self.parties.get(party)
        if pin is not None and not pin.matches(claims):
            raise PolicyRejected(
                f"party {party!r} runs {claims.tee.value} {claims.short_id()}, not an identity the policy pins for"
                f" that name", check=Check.PARTY_IDENTITY, claims=claims,
            )  # fmt: skip

    def _check_sgx(self, claims: Claims) -> None:
        enabled = self.enabled_sgx_fields
        if self.verify_enclave_debuggable == "on":
            candidates = [e for e in self.sgx_mrs if e.debuggable == claims.debug]
            if not candidates:
                raise PolicyRejected(
                    f"debug attribute {claims.debug} matches no sgx_mrs entry (verify_enclave_debuggable is on)",
                    check=Check.DEBUG,
                )
        else:
            candidates = list(self.sgx_mrs)
        if not enabled:
            if self.tdx_mrs:
                raise PolicyRejected(
                    "policy pins only TDX identities (tdx_mrs): no SGX enclave is allowed",
                    check=Check.MR_ENCLAVE,
                )
            return
        if not self.sgx_mrs:
            raise PolicyRejected(
                f"policy turns verify_{enabled[0]} on but sgx_mrs is empty: no enclave is allowed",
                check=enabled[0],
            )
        for name in enabled:
            got = getattr(claims, name)
            if name == "isv_svn":
                matching = [e for e in candidates if got >= e.isv_svn]
                if not matching:
                    minimum = min(e.isv_svn for e in candidates if e.isv_svn is not None)
                    raise PolicyRejected(f"isv_svn {got} below minimum {minimum}", check=Check.ISV_SVN)
            else:
                want = got.hex() if isinstance(got, bytes) else got
                matching = [e for e in candidates if getattr(e, name) == want]
                if not matching:
                    raise PolicyRejected(
                        _mismatch(name, want, [getattr(e, name) for e in candidates]), check=name
                    )
            candidates = matching

    def _check_tdx(self, claims: Claims) -> None:
        if not self.tdx_mrs:
            if self.enabled_sgx_fields:
                raise PolicyRejected(
                    "policy pins only SGX identities (sgx_mrs): no TDX guest is allowed",
                    check=Check.MR_TD,
                )
            return
        rtmrs = (*claims.rtmrs, b"", b"", b"", b"")[:4]
        measured = {"mr_td": claims.mr_td, **{f"rtmr{i}": rtmrs[i] for i in range(4)},
                    **{name: getattr(claims, name) for name in TDX_FIELDS[5:]}}  # fmt: skip
        candidates = list(self.tdx_mrs)
        for name in TDX_FIELDS:
            got = measured[name].hex()
            matching = [e for e in candidates if getattr(e, name) in (None, got)]
            if not matching:
                wanted = [getattr(e, name) for e in candidates]
                check = "rtmr" if name.startswith("rtmr") else name
                raise PolicyRejected(_mismatch(name, got, wanted), check=check)
            candidates = matching

    # -- identity of the policy itself ----------------------------------------------------

    def canonical(self) -> dict[str, Any]:
        """The policy's meaning: disabled fields dropped, entries sorted and deduplicated."""
        enabled = self.enabled_sgx_fields
        debuggable = self.verify_enclave_debuggable == "on"
        checked = (*enabled, "debuggable") if debuggable else enabled
        sgx = {
            json.dumps({n: getattr(e, n) for n in checked}, sort_keys=True) for e in self.sgx_mrs
        }
        tdx = {json.dumps(e.model_dump(exclude_none=True), sort_keys=True) for e in self.tdx_mrs}
        canonical = {
            "format": _CANONICAL_TAG,
            "verify": [*enabled, *(["enclave_debuggable"] if debuggable else [])],
            "sgx_mrs": [json.loads(e) for e in sorted(sgx)] if checked else [],
            "tdx_mrs": [json.loads(e) for e in sorted(tdx)],
            "allowed_tcb_status": sorted(set(self.allowed_tcb_status)),
            "allow_debug": self.allow_debug,
            "allow_simulated": self.allow_simulated,
        }
        # Only present when set, so the digest of a policy without a budget is unchanged.
        if self.privacy is not None:
            canonical["privacy"] = self.privacy.canonical()
        if self.parties:  # likewise
            canonical["parties"] = {name: pin.canonical() for name, pin in sorted(self.parties.items())}
        return canonical

    def privacy_claim(self) -> bytes:
        """The canonical JSON of the privacy budget (b"" without one), bound into this party's
        claims next to the digest so that a peer's refusal can say which budget differs."""
        if self.privacy is None:
            return b""
        return json.dumps(self.privacy.canonical(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON: equal for semantically equal policies."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).digest()

    def to_json(self) -> dict[str, Any]:
        """The policy as a JSON object that `from_json` reads back to an equal policy."""
        out = self.model_dump(mode="json", exclude={"sgx_mrs", "tdx_mrs", "privacy", "parties"}, exclude_none=True)
        if self.privacy is not None:
            out["privacy"] = self.privacy.canonical()
        if self.parties:
            out["parties"] = {name: pin.canonical() for name, pin in self.parties.items()}
        out["sgx_mrs"] = [e.model_dump(exclude_none=True) for e in self.sgx_mrs]
        out["tdx_mrs"] = [e.model_dump(exclude_none=True) for e in self.tdx_mrs]
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the policy as JSON, atomically (a reader never sees half a file)."""
        file = Path(path)
        text = json.dumps(self.to_json(), indent=2) + "\n"
        try:
            atomic_write_bytes(file, text.encode("utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot write policy {file}: {exc}") from None


def load_policy(path: str | os.PathLike[str] | None) -> Policy:
    """The policy in the JSON file `path`, or the default one (UpToDate only, no debug, no
    simulated evidence) when no path is given."""
    return Policy.load(path) if path is not None else Policy.default()


def read_measurement(path: Path) -> dict[str, Any]:
    """One identity from a JSON file that `enclavefl measure --json` (or `gramine build`'s
    measurement.json) wrote, for `Policy.from_measurements`; UsageError if it is not one."""
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise UsageError(f"{path} is not JSON from `enclavefl measure --json`: {err}") from err
    if not isinstance(measured, dict):
        raise UsageError(f"{path} is not JSON from `enclavefl measure --json`")
    return measured


def _json_problem(text: str, exc: json.JSONDecodeError) -> str:
    """The decoder's message, or for a trailing comma (CCZoo's README template has one)
    the line and column of that comma, which is what the user has to delete."""
    before = text[: exc.pos].rstrip()
    if before.endswith(",") and text[exc.pos : exc.pos + 1] in ("}", "]"):
        comma = len(before) - 1
        line = text.count("\n", 0, comma) + 1
        column = comma - (text.rfind("\n", 0, comma) + 1) + 1
        return f"trailing comma at line {line} column {column} (JSON allows none before '{text[exc.pos]}'; delete it)"
    return str(exc)


def _short(value: Any) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) > 12 else str(value)


def _mismatch(name: str, got: Any, allowed: list[Any]) -> str:
    unique = list(dict.fromkeys(allowed))
    return f"{name} mismatch: got {_short(got)}, policy allows [{', '.join(map(_short, unique))}]"


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        loc = error["loc"]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
        where = where.lstrip(".")
        if error["type"] == "extra_forbidden":
            parent = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[:-1]).lstrip(
                "."
            )
            problems.append(f"unknown key {loc[-1]!r}" + (f" in {parent}" if parent else ""))
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)
