"""Collateral sources: the offline file, and the PCCS path against a loopback PCCS."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PINNED_TIME

from enclavefl.errors import CollateralError, ConfigError, FormatError, UsageError
from enclavefl.tee.collateral import (
    ALIYUN_PCCS_URL,
    BYTEDANCE_PCCS_URL,
    DEFAULT_PCCS_URL,
    TENCENT_PCCS_URL,
    OfflineCollateral,
    PccsCollateral,
    collateral_key,
    normalize_pccs_url,
    pccs_url_from_qcnl,
)
from enclavefl.tee.quote import verify_quote

# From the shared data README: both samples verify offline in this window.
SGX_ISSUED, SGX_NEXT_UPDATE = 1750330571, 1752919278


class LoopbackPccs:
    """A PCCS on 127.0.0.1 serving one shared collateral file at the PCCS v4 API paths."""

    def __init__(self, collateral_file: Path, *, delay_s: float = 0.0) -> None:
        self.doc = json.loads(collateral_file.read_text())
        self.delay_s = delay_s
        self.requests: list[str] = []
        pccs = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                pccs.requests.append(self.path)
                time.sleep(pccs.delay_s)
                answer = pccs.answer(urllib.parse.urlsplit(self.path).path)
                if answer is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                body, headers = answer
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, urllib.parse.quote(value, safe=""))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str) -> tuple[bytes, dict[str, str]] | None:
        doc = self.doc
        if path == "/sgx/certification/v4/pckcrl":
            return bytes.fromhex(doc["pck_crl"]), {
                "SGX-PCK-CRL-Issuer-Chain": doc["pck_crl_issuer_chain"]
            }
        if path == "/sgx/certification/v4/rootcacrl":
            return doc["root_ca_crl"].encode(), {}  # PCCS answers hex, not DER
        if path in ("/sgx/certification/v4/tcb", "/tdx/certification/v4/tcb"):
            body = f'{{"tcbInfo":{doc["tcb_info"]},"signature":"{doc["tcb_info_signature"]}"}}'
            return body.encode(), {"TCB-Info-Issuer-Chain": doc["tcb_info_issuer_chain"]}
        if path in ("/sgx/certification/v4/qe/identity", "/tdx/certification/v4/qe/identity"):
            body = (
                f'{{"enclaveIdentity":{doc["qe_identity"]},'
                f'"signature":"{doc["qe_identity_signature"]}"}}'
            )
            return body.encode(), {
                "SGX-Enclave-Identity-Issuer-Chain": doc["qe_identity_issuer_chain"]
            }
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sgx_pccs(attestation_dir: Path) -> Iterator[LoopbackPccs]:
    pccs = LoopbackPccs(attestation_dir / "sgx_quote_collateral.json")
    yield pccs
    pccs.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- offline file ------------------------------------------------------------------------


def test_offline_collateral_reads_shared_file(attestation_dir: Path, sgx_quote: bytes) -> None:
    source = OfflineCollateral(attestation_dir / "sgx_quote_collateral.json")
    assert source.validity.issued_at == SGX_ISSUED
    assert source.validity.next_update == SGX_NEXT_UPDATE
    assert source.validity.first_to_expire == "QE identity"
    assert (
        verify_quote(sgx_quote, source, at=PINNED_TIME).tcb_status
        == "ConfigurationAndSWHardeningNeeded"
    )


def test_offline_collateral_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(UsageError, match="nope.json"):
        OfflineCollateral(missing)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("not json", "not valid collateral"),
        ('{"tcb_info": "x"}', "missing field"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_offline_collateral_invalid_file_is_format_error(
    tmp_path: Path, content: str | bytes, problem: str
) -> None:
    path = tmp_path / "bad_collateral.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(FormatError, match=problem) as info:
        OfflineCollateral(path)
    assert "bad_collateral.json" in str(info.value)


def test_offline_collateral_with_bad_dates_is_format_error(
    tmp_path: Path, attestation_dir: Path
) -> None:
    doc = json.loads((attestation_dir / "sgx_quote_collateral.json").read_text())
    doc["qe_identity"] = doc["qe_identity"].replace('"nextUpdate"', '"nextUpdat"')
    path = tmp_path / "dates.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="QE identity has no valid issueDate/nextUpdate"):
        OfflineCollateral(path)


# -- PCCS ----------------------------------------------------------------------------------


def test_pccs_first_get_fetches_then_serves_from_memory(
    sgx_pccs: LoopbackPccs, sgx_quote: bytes, tmp_path: Path
) -> None:
    source = PccsCollateral(sgx_pccs.url, cache_dir=tmp_path)
    claims = verify_quote(sgx_quote, source, at=PINNED_TIME)
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert sorted(p.split("?")[0] for p in sgx_pccs.requests) == [
        "/sgx/certification/v4/pckcrl",
        "/sgx/certification/v4/qe/identity",
        "/sgx/certification/v4/rootcacrl",
        "/sgx/certification/v4/tcb",
    ]
    assert "/sgx/certification/v4/tcb?fmspc=00A067110000&update=standard" in sgx_pccs.requests
    assert "/sgx/certification/v4/pckcrl?ca=processor&encoding=der" in sgx_pccs.requests

    fetched = len(sgx_pccs.requests)
    first = source.get(sgx_quote, at=PINNED_TIME)
    assert verify_quote(sgx_quote, source, at=PINNED_TIME + 3600) == claims
    assert source.get(sgx_quote, at=PINNED_TIME) is first  # the parsed object, kept in memory
    assert len(sgx_pccs.requests) == fetched


def test_pccs_cache_survives_restart_without_requests(
    sgx_pccs: LoopbackPccs, sgx_quote: bytes, tmp_path: Path
) -> None:
    PccsCollateral(sgx_pccs.url, cache_dir=tmp_path).get(sgx_quote, at=PINNED_TIME)
    fetched = len(sgx_pccs.requests)

    restarted = PccsCollateral(sgx_pccs.url, cache_dir=tmp_path)
    claims = verify_quote(sgx_quote, restarted, at=PINNED_TIME)
    assert claims.mr_signer.hex().startswith("815f42f11cf6")
    assert len(sgx_pccs.requests) == fetched

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["sgx-00A067110000-processor.json"]  # atomic: no temp file left over
    cached = json.loads((tmp_path / files[0]).read_text())
    assert cached["next_update"] == "2025-07-19T10:01:18Z"
    # The quote's own PCK chain is platform-specific and must not be shared via the cache.
    assert "pck_certificate_chain" not in cached["collateral"]


def test_pccs_refetches_past_next_update(
    sgx_pccs: LoopbackPccs, sgx_quote: bytes, tmp_path: Path
) -> None:
    source = PccsCollateral(sgx_pccs.url, cache_dir=tmp_path)
    source.get(sgx_quote, at=PINNED_TIME)
    fetched = len(sgx_pccs.requests)

    source.get(sgx_quote, at=SGX_NEXT_UPDATE - 1)
    assert len(sgx_pccs.requests) == fetched
    source.get(sgx_quote, at=SGX_NEXT_UPDATE)
    assert len(sgx_pccs.requests) == 2 * fetched

    # Likewise for a cache entry on disk read by a fresh process.
    PccsCollateral(sgx_pccs.url, cache_dir=tmp_path).get(sgx_quote, at=SGX_NEXT_UPDATE + 60)
    assert len(sgx_pccs.requests) == 3 * fetched


def test_pccs_tdx_quote_uses_tdx_paths(
    attestation_dir: Path, tdx_quote: bytes, tmp_path: Path
) -> None:
    pccs = LoopbackPccs(attestation_dir / "tdx_quote_collateral.json")
    try:
        claims = verify_quote(
            tdx_quote, PccsCollateral(pccs.url, cache_dir=tmp_path), at=PINNED_TIME
        )
    finally:
        pccs.close()
    assert claims.tcb_status == "UpToDate"
    assert "/tdx/certification/v4/tcb?fmspc=B0C06F000000&update=standard" in pccs.requests
    assert "/sgx/certification/v4/pckcrl?ca=platform&encoding=der" in pccs.requests
    assert (tmp_path / "tdx-B0C06F000000-platform.json").exists()


@pytest.mark.parametrize("corrupt", ["{ half a file", '{"collateral": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_pccs_corrupt_cache_entry_is_refetched(
    sgx_pccs: LoopbackPccs, sgx_quote: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupt: str
) -> None:
    (tmp_path / "sgx-00A067110000-processor.json").write_text(corrupt)
    source = PccsCollateral(sgx_pccs.url, cache_dir=tmp_path)
    source.get(sgx_quote, at=PINNED_TIME)
    assert sgx_pccs.requests
    assert "ignoring unreadable collateral cache" in caplog.text
    assert json.loads((tmp_path / "sgx-00A067110000-processor.json").read_text())["collateral"]


def test_pccs_unreachable_is_collateral_error(sgx_quote: bytes, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(CollateralError, match=rf"^PCCS {url} unreachable: "):
        PccsCollateral(url, cache_dir=tmp_path).get(sgx_quote, at=PINNED_TIME)


def test_pccs_timeout_is_collateral_error(
    attestation_dir: Path, sgx_quote: bytes, tmp_path: Path
) -> None:
    pccs = LoopbackPccs(attestation_dir / "sgx_quote_collateral.json", delay_s=1.0)
    try:
        source = PccsCollateral(pccs.url, cache_dir=tmp_path, timeout_s=0.2)
        with pytest.raises(CollateralError, match="unreachable: no answer within 0.2 s"):
            source.get(sgx_quote, at=PINNED_TIME)
    finally:
        pccs.close()


def test_pccs_http_error_is_collateral_error(
    sgx_pccs: LoopbackPccs, sgx_quote: bytes, tmp_path: Path
) -> None:
    sgx_pccs.answer = lambda path: None  # type: ignore[method-assign]  # 404 everywhere
    with pytest.raises(CollateralError, match="refused the collateral request: .*404"):
        PccsCollateral(sgx_pccs.url, cache_dir=tmp_path).get(sgx_quote, at=PINNED_TIME)


def test_pccs_rejects_non_quote(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot find FMSPC/CA"):
        PccsCollateral(DEFAULT_PCCS_URL, cache_dir=tmp_path).get(b"\x03\x00" * 40, at=PINNED_TIME)


def test_collateral_key(sgx_quote: bytes, tdx_quote: bytes) -> None:
    assert collateral_key(sgx_quote).file_name == "sgx-00A067110000-processor.json"
    assert collateral_key(tdx_quote).file_name == "tdx-B0C06F000000-platform.json"
    assert collateral_key(sgx_quote).shareable


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, base",
    [
        (ALIYUN_PCCS_URL, "https://sgx-dcap-server.cn-hangzhou.aliyuncs.com"),
        (TENCENT_PCCS_URL, "https://sgx-dcap-server-tc.sh.tencent.cn"),
        (BYTEDANCE_PCCS_URL, "https://sgx-dcap-server.bytedance.com"),
        ("https://localhost:8081/sgx/certification/v4/", "https://localhost:8081"),
        ("https://pccs.example/tdx/certification/v4", "https://pccs.example"),
        (" https://api.trustedservices.intel.com/ ", "https://api.trustedservices.intel.com"),
    ],
)
def test_normalize_pccs_url(url: str, base: str) -> None:
    assert normalize_pccs_url(url) == base


@pytest.mark.parametrize("url", ["", "pccs.example", "ftp://pccs.example", "https://"])
def test_normalize_pccs_url_rejects_garbage(url: str) -> None:
    with pytest.raises(ConfigError, match="PCCS URL"):
        normalize_pccs_url(url)


# Shaped like the JSON file Intel's DCAP packages install (comments, leading commas).
QCNL_JSON = """{
  // *** ATTENTION : This file is in JSON format so the keys are case sensitive.

  //PCCS server address
  "pccs_url": "https://localhost:8081/sgx/certification/v4/"

  // To accept insecure HTTPS certificate, set this option to false
  ,"use_secure_cert": false

  /* When collateral_service is not defined, both PCK Certs and verification
     collateral will be retrieved using pccs_url */
  //,"collateral_service": "https://api.trustedservices.intel.com/sgx/certification/v4/"
  ,"retry_times": 6
}
"""


def test_qcnl_json_with_comments(tmp_path: Path) -> None:
    conf = tmp_path / "sgx_default_qcnl.conf"
    conf.write_text(QCNL_JSON)
    assert pccs_url_from_qcnl(conf) == "https://localhost:8081/sgx/certification/v4/"


def test_qcnl_collateral_service_wins(tmp_path: Path) -> None:
    conf = tmp_path / "sgx_default_qcnl.conf"
    conf.write_text(QCNL_JSON.replace('//,"collateral_service"', ',"collateral_service"'))
    assert pccs_url_from_qcnl(conf) == "https://api.trustedservices.intel.com/sgx/certification/v4/"


def test_qcnl_legacy_format(tmp_path: Path) -> None:
    conf = tmp_path / "sgx_default_qcnl.conf"
    conf.write_text(
        "# PCCS server address\n"
        "PCCS_URL=https://sgx-dcap-server.cn-hangzhou.aliyuncs.com/sgx/certification/v3/\n"
        "USE_SECURE_CERT=TRUE\n"
    )
    url = pccs_url_from_qcnl(conf)
    assert url == ALIYUN_PCCS_URL
    assert normalize_pccs_url(url) == "https://sgx-dcap-server.cn-hangzhou.aliyuncs.com"


def test_qcnl_missing_file_is_none(tmp_path: Path) -> None:
    assert pccs_url_from_qcnl(tmp_path / "absent.conf") is None


@pytest.mark.parametrize(
    "text, problem",
    [('{"pccs_url": ', "not valid JSON"), ('{"retry_times": 6}', "sets neither"),
     ('{"pccs_url": 8081}', "must be a string"), ("[1]", "JSON object"),
     ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply")],
)  # fmt: skip
def test_qcnl_invalid(tmp_path: Path, text: str, problem: str) -> None:
    conf = tmp_path / "qcnl.conf"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        pccs_url_from_qcnl(conf)


def _with_date(doc: dict[str, object], piece: str, field: str, value: object) -> dict[str, object]:
    inner = json.loads(str(doc[piece]))
    inner[field] = value
    return {**doc, piece: json.dumps(inner)}


@pytest.mark.parametrize("piece", ["tcb_info", "qe_identity"])
@pytest.mark.parametrize("field", ["issueDate", "nextUpdate"])
@pytest.mark.parametrize("value", [12345, None, ["2025-01-01T00:00:00Z"], {"a": 1}, "2025-01-01T00:00:00"])
def test_offline_collateral_date_not_a_string_is_format_error(
    tmp_path: Path, attestation_dir: Path, piece: str, field: str, value: object
) -> None:
    doc = json.loads((attestation_dir / "sgx_quote_collateral.json").read_text())
    path = tmp_path / "dates.json"
    path.write_text(json.dumps(_with_date(doc, piece, field, value)))
    with pytest.raises(FormatError, match="has no valid issueDate/nextUpdate"):
        OfflineCollateral(path)


@pytest.mark.parametrize("field", ["issueDate", "nextUpdate"])
def test_pccs_collateral_date_not_a_string_is_collateral_error(
    sgx_pccs: LoopbackPccs, sgx_quote: bytes, tmp_path: Path, field: str
) -> None:
    sgx_pccs.doc = _with_date(sgx_pccs.doc, "tcb_info", field, 1750330571)
    with pytest.raises(CollateralError, match="unusable collateral: .*TCB info has no valid"):
        PccsCollateral(sgx_pccs.url, cache_dir=tmp_path).get(sgx_quote, at=PINNED_TIME)
