"""Quote verification time: with collateral cached in memory vs the first, uncached verification.

For the real SGX and TDX sample quotes (../shared/data/attestation), a loopback PCCS on
127.0.0.1 serves their collateral at the PCCS v4 API paths. "uncached" is the first
`verify_quote` through a fresh `PccsCollateral` with an empty cache directory (fetch, parse,
cache write, verify); "disk" is the first one of a fresh instance over a warm disk cache;
"cached" is every later one (collateral in memory), timed both as wall clock and as this
thread's CPU time: on a loaded machine the wall-clock tail is mostly waiting for a CPU.
Target: cached verification under 5 ms (wall-clock median and CPU-time p90).
Prints one JSON object.

    python bench/bench_verify.py [--iterations 1000] [--cold-reps 5]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from enclavefl.tee.collateral import PccsCollateral, collateral_key
from enclavefl.tee.quote import verify_quote

TARGET_MS = 5.0
AT = 1751328000  # both samples' collateral is valid then
DATA = Path(
    os.environ.get("ENCLAVEFL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def serve_pccs(collateral: dict[str, str]) -> http.server.ThreadingHTTPServer:
    """A loopback PCCS answering dcap-qvl's four collateral requests from one collateral file."""
    c = collateral
    tcb_info = f'{{"tcbInfo":{c["tcb_info"]},"signature":"{c["tcb_info_signature"]}"}}'
    qe_identity = (
        f'{{"enclaveIdentity":{c["qe_identity"]},"signature":"{c["qe_identity_signature"]}"}}'
    )
    answers = {
        "pckcrl": (
            bytes.fromhex(c["pck_crl"]),
            {"SGX-PCK-CRL-Issuer-Chain": c["pck_crl_issuer_chain"]},
        ),
        "rootcacrl": (c["root_ca_crl"].encode(), {}),  # PCCS answers hex, not DER
        "tcb": (tcb_info.encode(), {"TCB-Info-Issuer-Chain": c["tcb_info_issuer_chain"]}),
        "identity": (
            qe_identity.encode(),
            {"SGX-Enclave-Identity-Issuer-Chain": c["qe_identity_issuer_chain"]},
        ),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, headers = answers[urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[-1]]
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, urllib.parse.quote(value, safe=""))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _timed_verify(quote: bytes, source: PccsCollateral) -> tuple[float, float]:
    """Wall-clock and this thread's CPU milliseconds of one verification."""
    wall, cpu = time.perf_counter(), time.thread_time()
    verify_quote(quote, source, at=AT)
    return (time.perf_counter() - wall) * 1000, (time.thread_time() - cpu) * 1000


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def bench_one(name: str, iterations: int, cold_reps: int) -> dict[str, float]:
    quote = (DATA / "attestation" / f"{name}_quote").read_bytes()
    server = serve_pccs(
        json.loads((DATA / "attestation" / f"{name}_quote_collateral.json").read_text())
    )
    url = f"http://127.0.0.1:{server.server_address[1]}"
    uncached, disk = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(cold_reps):
            collateral_key.cache_clear()
            source = PccsCollateral(url, cache_dir=Path(tmp) / f"empty-{rep}")
            uncached.append(_timed_verify(quote, source)[0])
            collateral_key.cache_clear()
            source = PccsCollateral(url, cache_dir=Path(tmp) / f"empty-{rep}")
            disk.append(_timed_verify(quote, source)[0])
        timings = [_timed_verify(quote, source) for _ in range(iterations)]
    server.shutdown()
    server.server_close()
    wall = [w for w, _ in timings]
    cpu = [c for _, c in timings]
    median = statistics.median(wall)
    return {
        "cached_median_ms": round(median, 3),
        "cached_p90_ms": round(_p90(wall), 3),
        "cached_cpu_median_ms": round(statistics.median(cpu), 3),
        "cached_cpu_p90_ms": round(_p90(cpu), 3),
        "uncached_first_median_ms": round(statistics.median(uncached), 3),
        "disk_cache_first_median_ms": round(statistics.median(disk), 3),
        "uncached_over_cached": round(statistics.median(uncached) / median, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--cold-reps", type=int, default=5)
    args = parser.parse_args()
    if not (DATA / "attestation").is_dir():
        print(
            json.dumps({"benchmark": "verify_quote", "error": f"shared data not found at {DATA}"})
        )
        sys.exit(2)
    results = {name: bench_one(name, args.iterations, args.cold_reps) for name in ("sgx", "tdx")}
    print(json.dumps({
        "benchmark": "verify_quote",
        "iterations": args.iterations,
        "cold_reps": args.cold_reps,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "target_ms": TARGET_MS,
        "results": results,
        "pass": all(
            r["cached_median_ms"] < TARGET_MS and r["cached_cpu_p90_ms"] < TARGET_MS
            for r in results.values()
        ),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
