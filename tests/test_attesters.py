"""Attesters against fake /dev/attestation and configfs-tsm trees, and the simulated quote.

This machine has no TEE, so a temp directory stands in for each device and a thin wrapper
around the `os` module plays the kernel's part (configfs populates an entry on mkdir, bumps
`generation` on every write, produces `outblob` on read). The attesters' own code runs as is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cbor2
import pytest

from enclavefl.errors import ConfigError, FormatError, UsageError
from enclavefl.tee import attesters
from enclavefl.tee.attesters import (
    GramineAttester,
    SimulatedAttester,
    TdxAttester,
    make_attester,
)
from enclavefl.tee.claims import TeeType
from enclavefl.tee.measure import Measurement
from enclavefl.tee.simulated import (
    SIMULATED_QUOTE_MARKER,
    encode_simulated_quote,
    parse_simulated_quote,
)

REPORT_DATA = bytes(range(64))
MEASUREMENT = Measurement(b"\x11" * 32, b"\x22" * 32, isv_prod_id=7, isv_svn=3)


class FakeKernel:
    """The `os` module as the attesters see it, with hooks where a kernel would act."""

    def __init__(self) -> None:
        self._paths: dict[int, Path] = {}

    def __getattr__(self, name: str):
        return getattr(os, name)

    def open(self, path, flags, *args):
        fd = os.open(path, flags, *args)
        self._paths[fd] = Path(path)
        return fd

    def write(self, fd, data):
        written = os.write(fd, data)
        self.on_write(self._paths[fd], bytes(data))
        return written

    def close(self, fd):
        self._paths.pop(fd, None)
        os.close(fd)

    def mkdir(self, path, *args):
        os.mkdir(path, *args)
        self.on_mkdir(Path(path))

    def rmdir(self, path):
        self.on_rmdir(Path(path))
        os.rmdir(path)

    def on_write(self, path: Path, data: bytes) -> None:
        pass

    def on_mkdir(self, path: Path) -> None:
        pass

    def on_rmdir(self, path: Path) -> None:
        pass


class FakeGramine(FakeKernel):
    """/dev/attestation: writing user_report_data makes the next quote carry it."""

    def __init__(self, root: Path, attestation_type: str = "dcap") -> None:
        super().__init__()
        self.root = root
        root.mkdir()
        (root / "attestation_type").write_text(attestation_type + "\n")
        (root / "user_report_data").write_bytes(b"")
        (root / "quote").write_bytes(b"")

    def on_write(self, path: Path, data: bytes) -> None:
        if path == self.root / "user_report_data":
            (self.root / "quote").write_bytes(b"sgx-quote-over:" + data)


class FakeTsm(FakeKernel):
    """configfs-tsm: entries appear populated on mkdir; inblob writes bump generation."""

    def __init__(
        self, root: Path, provider: str = "tdx_guest", extra_writers: list[int] | None = None
    ):
        super().__init__()
        self.root = root
        self.provider = provider
        # Per created entry: how many writes "another process" slips in after ours.
        self.extra_writers = list(extra_writers or [])
        self.created: list[Path] = []
        self.removed: list[Path] = []
        self.inblobs: list[bytes] = []
        root.mkdir(parents=True)

    def on_mkdir(self, path: Path) -> None:
        assert path.parent == self.root
        self.created.append(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        (path / "inblob").write_bytes(b"")
        (path / "outblob").write_bytes(b"")

    def on_write(self, path: Path, data: bytes) -> None:
        if path.name != "inblob":
            return
        self.inblobs.append(data)
        racers = self.extra_writers.pop(0) if self.extra_writers else 0
        generation = int((path.parent / "generation").read_text()) + 1 + racers
        (path.parent / "generation").write_text(f"{generation}\n")
        (path.parent / "outblob").write_bytes(b"td-quote-over:" + data)

    def on_rmdir(self, path: Path) -> None:
        # configfs removes an entry's attributes with the directory.
        for child in path.iterdir():
            child.unlink()
        self.removed.append(path)


def test_gramine_attester_writes_report_data_then_reads_quote(tmp_path, monkeypatch):
    fake = FakeGramine(tmp_path / "attestation")
    monkeypatch.setattr(attesters, "os", fake)

    quote = GramineAttester(fake.root).quote(REPORT_DATA)

    assert (fake.root / "user_report_data").read_bytes() == REPORT_DATA
    assert quote == b"sgx-quote-over:" + REPORT_DATA
    assert GramineAttester.tee is TeeType.SGX


def test_gramine_attester_explains_disabled_remote_attestation(tmp_path, monkeypatch):
    fake = FakeGramine(tmp_path / "attestation", attestation_type="none")
    monkeypatch.setattr(attesters, "os", fake)
    with pytest.raises(ConfigError, match="remote attestation is disabled") as err:
        GramineAttester(fake.root).quote(REPORT_DATA)
    assert str(fake.root / "attestation_type") in err.value.reason
    assert (fake.root / "user_report_data").read_bytes() == b""


def test_gramine_attester_refuses_epid(tmp_path):
    fake = FakeGramine(tmp_path / "attestation", attestation_type="epid")
    with pytest.raises(ConfigError, match="only DCAP"):
        GramineAttester(fake.root).quote(REPORT_DATA)


def test_gramine_attester_names_the_missing_path(tmp_path):
    with pytest.raises(UsageError, match=str(tmp_path / "nothing" / "attestation_type")):
        GramineAttester(tmp_path / "nothing").quote(REPORT_DATA)


def test_gramine_attester_rejects_empty_quote(tmp_path):
    fake = FakeGramine(tmp_path / "attestation")  # plain files: the quote stays empty
    with pytest.raises(UsageError, match="empty quote"):
        GramineAttester(fake.root).quote(REPORT_DATA)


def test_tdx_attester_drives_configfs_tsm_entry(tmp_path, monkeypatch):
    fake = FakeTsm(tmp_path / "tsm" / "report")
    monkeypatch.setattr(attesters, "os", fake)

    quote = TdxAttester(fake.root).quote(REPORT_DATA)

    assert quote == b"td-quote-over:" + REPORT_DATA
    assert fake.inblobs == [REPORT_DATA]
    assert len(fake.created) == 1 and fake.removed == fake.created
    assert list(fake.root.iterdir()) == []


def test_tdx_attester_retries_when_another_writer_races(tmp_path, monkeypatch, caplog):
    fake = FakeTsm(tmp_path / "report", extra_writers=[1, 0])
    monkeypatch.setattr(attesters, "os", fake)

    with caplog.at_level(logging.WARNING, logger="enclavefl.tee.attesters"):
        quote = TdxAttester(fake.root).quote(REPORT_DATA)

    assert quote == b"td-quote-over:" + REPORT_DATA
    assert len(fake.created) == 2 and fake.removed == fake.created
    assert "generation 0 -> 2" in caplog.text


def test_tdx_attester_gives_up_after_bounded_retries(tmp_path, monkeypatch):
    fake = FakeTsm(tmp_path / "report", extra_writers=[1, 1, 1, 1])
    monkeypatch.setattr(attesters, "os", fake)
    with pytest.raises(UsageError, match="another writer on all 3 attempts"):
        TdxAttester(fake.root).quote(REPORT_DATA)
    assert len(fake.created) == 3 and fake.removed == fake.created


def test_tdx_attester_rejects_other_providers_and_cleans_up(tmp_path, monkeypatch):
    fake = FakeTsm(tmp_path / "report", provider="sev_guest")
    monkeypatch.setattr(attesters, "os", fake)
    with pytest.raises(UsageError, match="'sev_guest', expected 'tdx_guest'"):
        TdxAttester(fake.root).quote(REPORT_DATA)
    assert fake.inblobs == [] and fake.removed == fake.created


def test_tdx_attester_names_unusable_root(tmp_path):
    with pytest.raises(UsageError, match="cannot create configfs-tsm report entry"):
        TdxAttester(tmp_path / "missing").quote(REPORT_DATA)


@pytest.mark.parametrize("bad", [b"", b"\x00" * 32, b"\x00" * 63, b"\x00" * 65, "x" * 64])
def test_attesters_require_exactly_64_bytes(tmp_path, bad):
    for attester in (
        GramineAttester(tmp_path),
        TdxAttester(tmp_path),
        SimulatedAttester(MEASUREMENT),
    ):
        with pytest.raises(UsageError, match="exactly 64 bytes"):
            attester.quote(bad)


def test_simulated_attester_is_loud(caplog):
    with caplog.at_level(logging.WARNING, logger="enclavefl.tee.attesters"):
        attester = SimulatedAttester(MEASUREMENT)
    assert "INSECURE simulated attestation" in caplog.text
    assert attester.tee is TeeType.SIMULATED
    claims = parse_simulated_quote(attester.quote(REPORT_DATA))
    assert claims.report_data == REPORT_DATA
    assert claims.mr_enclave == MEASUREMENT.mr_enclave


def test_make_attester_auto_prefers_gramine_then_tdx(tmp_path):
    gramine = tmp_path / "attestation"
    tsm = tmp_path / "tsm"
    gramine.mkdir()
    tsm.mkdir()
    (gramine / "quote").write_bytes(b"")
    assert isinstance(make_attester(gramine_root=gramine, tsm_root=tsm), GramineAttester)
    (gramine / "quote").unlink()
    attester = make_attester(gramine_root=gramine, tsm_root=tsm)
    assert isinstance(attester, TdxAttester) and attester.root == tsm


def test_make_attester_auto_never_silently_simulates(tmp_path):
    with pytest.raises(UsageError, match="no TEE found") as err:
        make_attester(gramine_root=tmp_path / "a", tsm_root=tmp_path / "b")
    assert "allow_simulated_insecure" in err.value.reason


def test_make_attester_simulates_on_opt_in(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="enclavefl.tee.attesters"):
        attester = make_attester(
            gramine_root=tmp_path / "a", tsm_root=tmp_path / "b",
            allow_simulated_insecure=True, measurement=MEASUREMENT,
        )  # fmt: skip
    assert isinstance(attester, SimulatedAttester) and attester.measurement == MEASUREMENT
    assert "INSECURE" in caplog.text
    assert isinstance(make_attester("simulated", measurement=MEASUREMENT), SimulatedAttester)


def test_make_attester_explicit_kinds_and_unknown(tmp_path):
    assert isinstance(make_attester("gramine", gramine_root=tmp_path), GramineAttester)
    assert isinstance(make_attester("tdx", tsm_root=tmp_path), TdxAttester)
    with pytest.raises(UsageError, match="unknown attester 'sgx'"):
        make_attester("sgx")


# -- the simulated quote format ---------------------------------------------------------


def test_simulated_quote_round_trip():
    claims = parse_simulated_quote(encode_simulated_quote(MEASUREMENT, REPORT_DATA))
    assert claims.tee is TeeType.SIMULATED and claims.insecure
    assert claims.tcb_status == "SimulatedInsecure"
    assert (claims.mr_enclave, claims.mr_signer) == (MEASUREMENT.mr_enclave, MEASUREMENT.mr_signer)
    assert (claims.isv_prod_id, claims.isv_svn) == (7, 3)
    assert claims.debug is False and claims.report_data == REPORT_DATA


def _quote_map() -> dict:
    return cbor2.loads(encode_simulated_quote(MEASUREMENT, REPORT_DATA))


def _with(**changes) -> bytes:
    quote = _quote_map()
    for key, value in changes.items():
        if value is None:
            del quote[key]
        else:
            quote[key] = value
    return cbor2.dumps(quote)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        encode_simulated_quote(MEASUREMENT, REPORT_DATA) + b"\x00",  # trailing bytes
        cbor2.dumps([1, 2, 3]),
        _with(**{SIMULATED_QUOTE_MARKER: 2}),
        _with(**{SIMULATED_QUOTE_MARKER: None}),
        _with(**{SIMULATED_QUOTE_MARKER: True}),
        _with(tee="sgx"),
        _with(mr_enclave=b"\x11" * 31),
        _with(report_data=b"\x00" * 32),
        _with(isv_svn=True),
        _with(isv_prod_id=70000),
        _with(debug=0),
        _with(extra=b"x"),
        cbor2.dumps(cbor2.CBORTag(1, 0)),
    ],
)
def test_simulated_quote_malformed_is_format_error(data):
    with pytest.raises(FormatError):
        parse_simulated_quote(data)


def test_encode_simulated_quote_requires_64_bytes():
    with pytest.raises(UsageError):
        encode_simulated_quote(MEASUREMENT, b"\x00" * 32)
