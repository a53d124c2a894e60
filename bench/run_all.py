"""Run every bench/bench_*.py and write bench/results.json: each headline, its target, pass/fail.

Each bench prints one JSON object. Its headline figures are named in HEADLINES below
(a dotted path into that object, the comparison and the target), so a reader sees at a
glance where performance stands without knowing each bench's layout. A bench may also
print its own `"headline": [{"name", "value", "op", "target"}, ...]` list, which is
taken as it is. The machine's cores and load average are recorded beside the figures:
these are 2-core machines shared with other work, and ratios measured in one run are
what to compare, not absolute times.

    python bench/run_all.py [--only NAME ...] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}

# bench name -> [(headline name, dotted path, op, target)]
HEADLINES: dict[str, list[tuple[str, str, str, float]]] = {
    "bench_verify": [
        ("sgx cached verification ms", "results.sgx.cached_median_ms", "<", 5.0),
        ("tdx cached verification ms", "results.tdx.cached_median_ms", "<", 5.0),
    ],
    "bench_seal": [
        ("seal / plain AES-GCM throughput", "seal_ratio", ">=", 0.8),
        ("unseal / plain AES-GCM throughput", "unseal_ratio", ">=", 0.8),
    ],
    "bench_channel": [
        ("attested / TLS gRPC upload (pinned cores)", "ratio_attested_vs_tls_pinned.upload", ">=", 0.95),
        ("attested / TLS gRPC download (pinned cores)", "ratio_attested_vs_tls_pinned.download", ">=", 0.95),
        ("connection set-up p90 ms", "connection_setup_ms.p90_total", "<", 50.0),
    ],
    "bench_hfl": [
        ("fedavg round / slowest local training", "fedavg_round_over_slowest_training.median_ratio", "<=", 1.05),
        ("sync-sgd step / slowest compute", "sync_sgd_step_over_slowest_compute.median_ratio", "<=", 1.25),
        ("PS memory growth in model sizes (bound allocator)", "ps_memory_fedavg.1.growth_in_model_sizes", "<=", 4.0),
    ],
    "bench_vfl": [("wide&deep split / unsplit per step", "wide_deep.split_over_unsplit", "<=", 1.3)],
    "bench_flood": [
        ("round time under 1,000 stalled unauthenticated calls / unloaded (max)", "max_round_ratio", "<=", 1.2)
    ],
    "bench_keras": [
        ("Keras 100 MB weight exchange: worker peak RSS / model size", "exchange.peak_over_model_size", "<=", 3.0),
        (
            "Keras weight exchange: bytes on the wire == model size",
            "exchange.bytes_on_wire_equal_model_size",
            "==",
            True,
        ),
    ],
    "bench_align": [
        ("tee-join 1M x 1M seconds", "tee_join.both_sequential.wall_s", "<=", 3.0),
        ("ecdh-psi 1M x 1M seconds", "ecdh_psi.both_sequential.wall_s", "<=", 90.0),
    ],
}


def _lookup(doc: Any, path: str) -> Any:
    for part in path.split("."):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _headlines(name: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = list(doc.get("headline", []))
    for title, path, op, target in HEADLINES.get(name, []):
        try:
            value = _lookup(doc, path)
        except (KeyError, IndexError, TypeError):
            rows.append({"name": title, "value": None, "op": op, "target": target, "error": f"no {path} in output"})
            continue
        rows.append({"name": title, "value": value, "op": op, "target": target})
    for row in rows:
        value = row.get("value")
        row["pass"] = None if not isinstance(value, int | float) else OPS[row["op"]](value, row["target"])
    return rows


def run_one(script: Path) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    entry: dict[str, Any] = {"wall_s": round(time.perf_counter() - started, 1), "exit_code": done.returncode}
    try:
        doc = json.loads(done.stdout)
    except json.JSONDecodeError:
        entry["error"] = (done.stderr.strip().splitlines() or ["no JSON on stdout"])[-1]
        entry["headline"] = []
        return entry
    entry["headline"] = _headlines(script.stem, doc)
    if not entry["headline"]:
        entry["headline_note"] = "this bench names no headline: add one to HEADLINES in bench/run_all.py"
    entry["output"] = doc
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="bench names (e.g. bench_seal)")
    parser.add_argument("--out", type=Path, default=BENCH / "results.json")
    args = parser.parse_args()
    scripts = sorted(BENCH.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem in set(args.only)]
    results: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "benches": {},
    }
    for script in scripts:
        print(f"== {script.name}", file=sys.stderr, flush=True)
        entry = run_one(script)
        results["benches"][script.stem] = entry
        for row in entry["headline"]:
            mark = {True: "pass", False: "FAIL", None: "n/a"}[row["pass"]]
            print(f"   {mark:4}  {row['name']}: {row['value']} (target {row['op']} {row['target']})", file=sys.stderr)
        if "error" in entry:
            print(f"   error: {entry['error']}", file=sys.stderr)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    failed = [s for s, e in results["benches"].items() if "error" in e or e["exit_code"] != 0]
    print(f"wrote {args.out}; benches that did not run: {failed or 'none'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
