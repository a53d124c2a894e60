"""Attesters: turn 64 bytes of report data into a quote from the TEE this party runs in.

`gramine` talks to Gramine's /dev/attestation pseudo-files (SGX DCAP quotes), `tdx` to
Linux configfs-tsm (TDX quotes), `simulated` writes an unsigned, self-reported quote and is
insecure. `make_attester("auto")` picks what the machine has and never falls back to
simulation unless told to with `allow_simulated_insecure=True`.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Protocol

from enclavefl.errors import ConfigError, FormatError, UsageError
from enclavefl.tee.claims import TeeType
from enclavefl.tee.measure import Measurement, simulated_measurement
from enclavefl.tee.simulated import REPORT_DATA_SIZE, encode_simulated_quote

log = logging.getLogger(__name__)

GRAMINE_ROOT = Path("/dev/attestation")
TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
TDX_TSM_PROVIDER = "tdx_guest"


class Attester(Protocol):
    """Produces hardware (or simulated) evidence over caller-chosen report data."""

    tee: TeeType

    def quote(self, report_data: bytes) -> bytes:
        """A quote whose report_data field is exactly `report_data` (64 bytes)."""
        ...


class GramineAttester:
    """SGX DCAP quotes from inside a Gramine enclave (sgx.remote_attestation = "dcap")."""

    tee = TeeType.SGX
    # /dev/attestation is per process: user_report_data then quote must not interleave.
    _lock = threading.Lock()

    def __init__(self, root: Path = GRAMINE_ROOT) -> None:
        self.root = Path(root)

    def quote(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        with self._lock:
            self._check_attestation_type()
            _write_file(self.root / "user_report_data", report_data)
            quote = _read_file(self.root / "quote")
        if not quote:
            raise UsageError(f"{self.root / 'quote'}: Gramine returned an empty quote")
        return quote

    def _check_attestation_type(self) -> None:
        path = self.root / "attestation_type"
        kind = _read_file(path).decode("ascii", errors="replace").strip()
        if kind == "dcap":
            return
        if kind == "none":
            raise ConfigError(
                f"{path} is 'none': remote attestation is disabled in the Gramine manifest; "
                'set sgx.remote_attestation = "dcap" and rebuild the enclave'
            )
        raise ConfigError(f"{path} is {kind!r}: only DCAP attestation is supported (not EPID)")


class TdxAttester:
    """TDX quotes through the Linux configfs-tsm report interface (kernel 6.7+).

    Each quote uses a fresh report entry. The entry's `generation` must advance by exactly
    our one write between writing `inblob` and reading `outblob`; otherwise another writer
    raced us and the outblob may not be ours, so we retry (bounded).
    """

    tee = TeeType.TDX

    def __init__(self, root: Path = TSM_REPORT_ROOT, *, max_attempts: int = 3) -> None:
        self.root = Path(root)
        self.max_attempts = max_attempts

    def quote(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        for attempt in range(1, self.max_attempts + 1):
            entry = self.root / f"enclavefl-{os.getpid()}-{secrets.token_hex(8)}"
            try:
                os.mkdir(entry)
            except OSError as exc:
                raise UsageError(
                    f"cannot create configfs-tsm report entry {entry}: {exc.strerror or exc}"
                ) from exc
            try:
                provider = _read_file(entry / "provider").decode("ascii", errors="replace").strip()
                if provider != TDX_TSM_PROVIDER:
                    raise UsageError(
                        f"{entry / 'provider'} is {provider!r}, expected {TDX_TSM_PROVIDER!r} "
                        "(not a TDX guest)"
                    )
                before = _read_generation(entry)
                _write_file(entry / "inblob", report_data)
                outblob = _read_file(entry / "outblob")
                after = _read_generation(entry)
            finally:
                _remove_entry(entry)
            if after == before + 1:
                if not outblob:
                    raise UsageError(f"{entry / 'outblob'}: the kernel returned an empty quote")
                return outblob
            log.warning(
                "configfs-tsm entry %s changed under us (generation %d -> %d, attempt %d of %d); "
                "retrying",
                entry,
                before,
                after,
                attempt,
                self.max_attempts,
            )
        raise UsageError(
            f"configfs-tsm report entries under {self.root} were rewritten by another writer "
            f"on all {self.max_attempts} attempts"
        )


class SimulatedAttester:
    """INSECURE: no TEE. Quotes are self-reported CBOR (see enclavefl.tee.simulated)."""

    tee = TeeType.SIMULATED

    def __init__(self, measurement: Measurement) -> None:
        self.measurement = measurement
        log.warning(
            "INSECURE simulated attestation: no TEE; quotes are self-reported and prove nothing "
            "(mr_enclave %s). Peers accept them only with allow_simulated in their policy.",
            measurement.mr_enclave.hex(),
        )

    def quote(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        return encode_simulated_quote(self.measurement, report_data)


def make_attester(
    kind: str = "auto",
    *,
    allow_simulated_insecure: bool = False,
    gramine_root: Path = GRAMINE_ROOT,
    tsm_root: Path = TSM_REPORT_ROOT,
    measurement: Measurement | None = None,
) -> Attester:
    """The attester for `kind` ("auto", "gramine", "tdx" or "simulated").

    "auto" picks Gramine when <gramine_root>/quote exists, else TDX when the configfs-tsm
    report directory exists, else simulation only with `allow_simulated_insecure`. Naming
    "simulated" explicitly is itself the opt-in. `measurement` is what a simulated party
    reports (default: `simulated_measurement()` of the installed package).
    """
    if kind == "auto":
        if (Path(gramine_root) / "quote").exists():
            kind = "gramine"
        elif Path(tsm_root).is_dir():
            kind = "tdx"
        elif allow_simulated_insecure:
            kind = "simulated"
        else:
            raise UsageError(
                f"no TEE found (neither {Path(gramine_root) / 'quote'} nor {tsm_root} exists); run "
                "under Gramine-SGX or in a TDX guest, or opt in to insecure simulation "
                "(allow_simulated_insecure / --attester simulated)"
            )
    if kind == "gramine":
        return GramineAttester(gramine_root)
    if kind == "tdx":
        return TdxAttester(tsm_root)
    if kind == "simulated":
        return SimulatedAttester(
            measurement if measurement is not None else simulated_measurement()
        )
    raise UsageError(f"unknown attester {kind!r}: expected auto, gramine, tdx or simulated")


def _check_report_data(report_data: bytes) -> None:
    if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != REPORT_DATA_SIZE:
        got = (
            len(report_data)
            if isinstance(report_data, (bytes, bytearray))
            else type(report_data).__name__
        )
        raise UsageError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes, got {got}")


# Plain os calls, one write() per value: pseudo-files (Gramine, configfs) take the whole
# value in a single write and produce their content on read.
def _read_file(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return b"".join(chunks)


def _write_file(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            written = os.write(fd, bytes(data))
        finally:
            os.close(fd)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if written != len(data):
        raise UsageError(f"short write to {path}: {written} of {len(data)} bytes")


def _read_generation(entry: Path) -> int:
    text = _read_file(entry / "generation").decode("ascii", errors="replace").strip()
    try:
        return int(text)
    except ValueError as exc:
        raise FormatError(f"{entry / 'generation'} is {text!r}, not an integer") from exc


def _remove_entry(entry: Path) -> None:
    try:
        os.rmdir(entry)
    except OSError as exc:
        # Not fatal for the quote we hold; an entry left behind only costs kernel memory.
        log.warning("could not remove configfs-tsm report entry %s: %s", entry, exc.strerror or exc)
