"""Quote-verification collateral (TCB info, QE identity, CRLs): from a file or from a PCCS.

A `CollateralSource` hands `verify_quote` the collateral for a quote at a verification
time. `OfflineCollateral` reads one JSON file (dcap-qvl's `QuoteCollateralV3` layout, as in
the shared sample data). `PccsCollateral` fetches from a PCCS with dcap-qvl, keeps the result
on disk and in memory per (TEE type, FMSPC, CA), and fetches again once the verification time
reaches the earliest nextUpdate of the TCB info, QE identity and CRLs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import dcap_qvl
from cryptography import x509

from enclavefl.fsutil import atomic_write_bytes
from enclavefl.errors import CollateralError, ConfigError, FormatError, UsageError

__all__ = [
    "ALIYUN_PCCS_URL",
    "AZURE_PCCS_URL",
    "BYTEDANCE_PCCS_URL",
    "DEFAULT_PCCS_URL",
    "DEFAULT_QCNL_CONF",
    "TENCENT_PCCS_URL",
    "CollateralKey",
    "CollateralSource",
    "CollateralValidity",
    "OfflineCollateral",
    "PccsCollateral",
    "collateral_key",
    "collateral_source",
    "collateral_validity",
    "default_cache_dir",
    "isotime",
    "normalize_pccs_url",
    "pccs_url_from_qcnl",
]

log = logging.getLogger(__name__)

# Intel's Provisioning Certification Service: the authoritative source, no API key needed
# for collateral. A deployment normally points at its own or its cloud's PCCS instead.
DEFAULT_PCCS_URL = dcap_qvl.INTEL_PCS_URL

# Cloud PCCS addresses as their documentation writes them in sgx_default_qcnl.conf.
# PccsCollateral keeps only the host part and asks it the PCCS v4 API
# (<host>/sgx/certification/v4/..., <host>/tdx/certification/v4/...).
# Alibaba Cloud (region in the host name; VPC-only instances use sgx-dcap-server-vpc.<region>).
ALIYUN_PCCS_URL = "https://sgx-dcap-server.cn-hangzhou.aliyuncs.com/sgx/certification/v3/"
# Tencent Cloud (regions sh, bj, gz: sgx-dcap-server-tc.<region>.tencent.cn).
TENCENT_PCCS_URL = "https://sgx-dcap-server-tc.sh.tencent.cn/sgx/certification/v3/"
# ByteDance / Volcengine (the URL Fedlearner's trusted jobs use).
BYTEDANCE_PCCS_URL = "https://sgx-dcap-server.bytedance.com/sgx/certification/v3/"
# Azure has no PCCS URL to configure here: its DCAP client (az-dcap-client) fetches
# collateral from Azure's Trusted Hardware Identity Management (THIM) cache, which Intel's
# Azure sample qcnl.conf names as https://global.acccache.azure.net/sgx/certification/v4/.
AZURE_PCCS_URL: str | None = None

DEFAULT_QCNL_CONF = Path("/etc/sgx_default_qcnl.conf")

_CACHE_FORMAT = "enclavefl-collateral-cache/1"
_PCCS_PATH_SUFFIX = re.compile(r"/(sgx|tdx)/certification/v[0-9]+$")
_FMSPC = re.compile(r"^[0-9A-F]{12}$")
_CAS = ("processor", "platform")
# Comments in Intel's JSON qcnl.conf: // or /* */ outside string literals.
_JSON_TOKEN_OR_COMMENT = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.S)


class CollateralSource(Protocol):
    def get(self, quote: bytes, *, at: int) -> dcap_qvl.QuoteCollateralV3:
        """Collateral to verify `quote` at unix time `at`."""
        ...


@dataclass(frozen=True)
class CollateralValidity:
    """When a set of collateral was issued and when its first piece needs replacing."""

    issued_at: int  # the newest issue date among its pieces
    next_update: int  # the earliest nextUpdate among its pieces
    first_to_expire: str  # which piece reaches nextUpdate first


@dataclass(frozen=True)
class CollateralKey:
    """What identifies collateral: the same for every platform of one FMSPC and CA."""

    tee: str  # "sgx" or "tdx"
    fmspc: str  # 12 upper-case hex digits
    ca: str  # "processor" or "platform"
    # Quotes without an embedded PCK certificate chain get a platform-specific chain
    # fetched into their collateral, which must not be shared with other platforms.
    shareable: bool

    @property
    def file_name(self) -> str:
        return f"{self.tee}-{self.fmspc}-{self.ca}.json"


def isotime(unix: int) -> str:
    """2025-07-19T10:01:18Z."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def collateral_validity(collateral: dcap_qvl.QuoteCollateralV3) -> CollateralValidity:
    """Issue and nextUpdate times of the TCB info, QE identity and the two CRLs."""
    pieces: list[tuple[str, int, int]] = []
    for name, text in (("TCB info", collateral.tcb_info), ("QE identity", collateral.qe_identity)):
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise TypeError(f"expected a JSON object, got {type(doc).__name__}")
            issued = _parse_rfc3339(doc["issueDate"])
            next_update = _parse_rfc3339(doc["nextUpdate"])
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise FormatError(
                f"collateral {name} has no valid issueDate/nextUpdate: {exc}"
            ) from None
        pieces.append((name, issued, next_update))
    for name, der in (("PCK CRL", collateral.pck_crl), ("root CA CRL", collateral.root_ca_crl)):
        try:
            crl = x509.load_der_x509_crl(bytes(der))
        except ValueError as exc:
            raise FormatError(f"collateral {name} is not a DER CRL: {exc}") from None
        if crl.next_update_utc is None:
            raise FormatError(f"collateral {name} has no nextUpdate")
        pieces.append(
            (name, int(crl.last_update_utc.timestamp()), int(crl.next_update_utc.timestamp()))
        )
    first = min(pieces, key=lambda piece: piece[2])
    return CollateralValidity(
        issued_at=max(piece[1] for piece in pieces), next_update=first[2], first_to_expire=first[0]
    )


@functools.lru_cache(maxsize=256)
def collateral_key(quote: bytes) -> CollateralKey:
    """The (TEE, FMSPC, CA) a quote needs collateral for (memoized: parsing it is slow)."""
    try:
        parsed = dcap_qvl.Quote.parse(quote)
        fmspc = parsed.fmspc().upper()
        ca = parsed.ca()
        shareable = parsed.cert_chain_pem_bytes() is not None
    except ValueError as exc:
        raise FormatError(f"cannot find FMSPC/CA in quote: {exc}") from None
    # These end up in a file name: accept only what Intel defines.
    if not _FMSPC.match(fmspc) or ca not in _CAS:
        raise FormatError(f"quote has an invalid FMSPC {fmspc!r} or CA {ca!r}")
    return CollateralKey("tdx" if parsed.is_tdx() else "sgx", fmspc, ca, shareable)


class OfflineCollateral:
    """Collateral read once from a JSON file (dcap-qvl QuoteCollateralV3 layout)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read collateral file {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise FormatError(f"collateral file {self.path} is not UTF-8 JSON") from None
        try:
            self._collateral = dcap_qvl.QuoteCollateralV3.from_json(text)
        except ValueError as exc:
            raise FormatError(
                f"collateral file {self.path} is not valid collateral: {exc}"
            ) from None
        try:
            self.validity = collateral_validity(self._collateral)
        except FormatError as exc:
            raise FormatError(f"collateral file {self.path}: {exc}") from None

    def get(self, quote: bytes, *, at: int) -> dcap_qvl.QuoteCollateralV3:
        return self._collateral


@dataclass(frozen=True)
class _Entry:
    collateral: dcap_qvl.QuoteCollateralV3
    next_update: int


class PccsCollateral:
    """Collateral from a PCCS (or Intel PCS), cached on disk and in memory until its nextUpdate.

    `url` may be a bare host or carry a `/sgx/certification/vN` path as qcnl.conf files do;
    only the host part is kept. Unreachable PCCS -> CollateralError.
    """

    def __init__(self, url: str, *, cache_dir: Path, timeout_s: float = 10.0) -> None:
        if not timeout_s > 0:
            raise UsageError(f"PCCS timeout must be positive, got {timeout_s}")
        self.url = normalize_pccs_url(url)
        self.cache_dir = Path(cache_dir)
        self.timeout_s = timeout_s
        self._memory: dict[CollateralKey, _Entry] = {}
        self._lock = threading.Lock()

    def get(self, quote: bytes, *, at: int) -> dcap_qvl.QuoteCollateralV3:
        quote = bytes(quote)
        key = collateral_key(quote)
        entry = self._memory.get(key)
        if entry is not None and at < entry.next_update:
            return entry.collateral
        if not key.shareable:
            return self._fetch(quote).collateral
        with self._lock:
            entry = self._memory.get(key)
            if entry is None or at >= entry.next_update:
                entry = self._read_cache(key)
            if entry is None or at >= entry.next_update:
                entry = self._fetch(quote)
                self._write_cache(key, entry)
            self._memory[key] = entry
            return entry.collateral

    def _fetch(self, quote: bytes) -> _Entry:
        log.info("fetching collateral from PCCS %s", self.url)
        try:
            collateral = _run(_get_collateral(self.url, quote, self.timeout_s))
        except TimeoutError:
            raise CollateralError(
                f"PCCS {self.url} unreachable: no answer within {self.timeout_s:g} s"
            ) from None
        except ValueError as exc:
            raise CollateralError(_pccs_failure(self.url, str(exc))) from None
        collateral = _without_pck_chain(collateral)
        try:
            validity = collateral_validity(collateral)
        except FormatError as exc:
            raise CollateralError(f"PCCS {self.url} returned unusable collateral: {exc}") from None
        return _Entry(collateral, validity.next_update)

    def _read_cache(self, key: CollateralKey) -> _Entry | None:
        path = self.cache_dir / key.file_name
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("ignoring unreadable collateral cache %s: %s", path, exc)
            return None
        try:
            if doc.get("format") != _CACHE_FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            collateral = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(doc["collateral"]))
            validity = collateral_validity(collateral)
        except (ValueError, KeyError, TypeError, AttributeError, FormatError) as exc:
            log.warning("ignoring invalid collateral cache %s: %s", path, exc)
            return None
        return _Entry(collateral, validity.next_update)

    def _write_cache(self, key: CollateralKey, entry: _Entry) -> None:
        doc = {
            "format": _CACHE_FORMAT,
            "pccs_url": self.url,
            "tee": key.tee,
            "fmspc": key.fmspc,
            "ca": key.ca,
            "next_update": isotime(entry.next_update),
            "collateral": json.loads(entry.collateral.to_json()),
        }
        try:
            _atomic_write_text(self.cache_dir / key.file_name, json.dumps(doc, indent=1))
        except OSError as exc:
            raise CollateralError(f"collateral cache {self.cache_dir} unusable: {exc}") from None


def normalize_pccs_url(url: str) -> str:
    """`https://host[:port]` from a PCCS URL with or without its `/sgx/certification/vN/` path."""
    base = url.strip().rstrip("/")
    base = _PCCS_PATH_SUFFIX.sub("", base)
    if not re.match(r"^https?://[^/\s]+", base):
        raise ConfigError(f"PCCS URL must start with https:// or http://, got {url!r}")
    return base


def pccs_url_from_qcnl(path: str | os.PathLike[str] = DEFAULT_QCNL_CONF) -> str | None:
    """The collateral URL an sgx_default_qcnl.conf configures, or None when there is no file.

    Reads Intel's JSON format (with // comments) and the older KEY=VALUE format. As in Intel's
    QCNL, `collateral_service` (when set) is where verification collateral comes from, else
    `pccs_url`.
    """
    conf = Path(path)
    try:
        text = conf.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {conf}: {exc}") from None
    values = _parse_qcnl_json(conf, text) if text.lstrip()[:1] in ("{", "[") else _parse_qcnl_legacy(text)
    url = values.get("collateral_service") or values.get("pccs_url")
    if not url:
        raise ConfigError(f"{conf} sets neither pccs_url nor collateral_service")
    if not isinstance(url, str):
        raise ConfigError(f"{conf}: pccs_url must be a string, got {url!r}")
    return url


def _parse_qcnl_json(conf: Path, text: str) -> dict[str, Any]:
    stripped = _JSON_TOKEN_OR_COMMENT.sub(
        lambda m: m.group(0) if m.group(0).startswith('"') else "", text
    )
    try:
        values = json.loads(stripped)
    except ValueError as exc:
        raise ConfigError(f"{conf} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{conf} is not valid JSON: nested too deeply") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{conf} must hold a JSON object")
    return values


def _parse_qcnl_legacy(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name.strip().lower()] = value.strip()
    return values


def _parse_rfc3339(value: Any) -> int:
    # The JSON is untrusted until its signature is checked: anything may stand here.
    if not isinstance(value, str):
        raise ValueError(f"expected an RFC 3339 string, got {type(value).__name__}")
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return int(when.timestamp())


def _without_pck_chain(collateral: dcap_qvl.QuoteCollateralV3) -> dcap_qvl.QuoteCollateralV3:
    # dcap-qvl attaches the quote's PCK chain; cached collateral must serve every platform.
    doc = json.loads(collateral.to_json())
    if doc.pop("pck_certificate_chain", None) is None:
        return collateral
    return dcap_qvl.QuoteCollateralV3.from_json(json.dumps(doc))


async def _get_collateral(url: str, quote: bytes, timeout_s: float) -> dcap_qvl.QuoteCollateralV3:
    # dcap-qvl's future must be created inside a running event loop.
    return await asyncio.wait_for(dcap_qvl.get_collateral(url, quote), timeout_s)


def _run(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, also when this thread runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _pccs_failure(url: str, message: str) -> str:
    detail = message.removeprefix("Failed to get collateral: ").strip()
    if "error sending request" in detail or "dns error" in detail or "connect" in detail:
        return f"PCCS {url} unreachable: {detail}"
    if "HTTP " in detail or "Failed to fetch" in detail:
        return f"PCCS {url} refused the collateral request: {detail}"
    return f"PCCS {url} returned unusable collateral: {detail}"


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))


def default_cache_dir() -> Path:
    """Where fetched collateral is cached: $XDG_CACHE_HOME/enclavefl/collateral."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "enclavefl" / "collateral"


def collateral_source(collateral_file: Path | None = None, pccs_url: str | None = None) -> CollateralSource:
    """An offline file when given; else the PCCS named, in sgx_default_qcnl.conf, or Intel's PCS."""
    if collateral_file is not None and pccs_url is not None:
        raise UsageError("give either an offline collateral file or a PCCS URL, not both")
    if collateral_file is not None:
        return OfflineCollateral(collateral_file)
    url = pccs_url or pccs_url_from_qcnl() or DEFAULT_PCCS_URL
    return PccsCollateral(url, cache_dir=default_cache_dir())
