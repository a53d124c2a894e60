"""Attested channel vs TLS gRPC (and insecure gRPC): tensor throughput and set-up, side by side.

A server process hosts the same Exchange service three times with the same chunking and
handlers: behind the attested channel (RA-TLS + admission + session interceptor,
simulated evidence); on a TLS gRPC port with an ordinary self-signed certificate of the
same key type (EC P-384), pinned by the client, as Flower or NVFlare deployments run; and
on an insecure port. Attested/TLS is the cost of attestation itself (the headline);
attested/insecure, for information, adds the cost of TLS. The client alternates between the two
(upload: a tensor to the server; download: a tensor back), so machine noise hits both.
Besides wall-clock throughput it reports the CPU time both processes spent per transfer,
which a busy machine disturbs less. Both processes use `tune_allocator()`, as parties
should. Every round runs twice: "shared" (both processes on every core, contending with
each other and with anything else running) and "pinned" (client on one core, server on
another, as on separate hosts); the path order rotates each round. Prints one JSON object:
`ratio_attested_vs_tls_<layout>` are the headline throughput ratios (medians, target
>= 0.95), `ratio_attested_vs_plain_<layout>` the same against insecure gRPC, and each layout
also reports per-round ratio ranges, CPU time per transfer per path and per side.

    python bench/bench_channel.py [--mib 256] [--rounds 5] [--connections 30] [--chunk-mib 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent import futures
from datetime import datetime, timedelta, UTC
from typing import Any

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavefl.net.admission import PartyCredentials, Peer
from enclavefl.net.allocator import tune_allocator
from enclavefl.net.client import AttestedClient
from enclavefl.net.exchange import ExchangeServicer, Router, call, channel_options, exchange_callable
from enclavefl.net.probe import fetch_certificate, verify_server_certificate
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import Limits, Message
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.measure import Measurement
from enclavefl.tee.policy import Policy

MEASUREMENT = Measurement(hashlib.sha256(b"bench enclave").digest(), hashlib.sha256(b"bench signer").digest())
POLICY = Policy.from_values(mr_enclave=MEASUREMENT.mr_enclave, allow_simulated=True)
JOB = "bench-channel"
TLS_NAME = "bench-tls"
THROUGHPUT_TARGET = 0.95  # attested / TLS


def _handlers(payload: np.ndarray) -> dict[str, Any]:
    return {
        "upload": lambda peer, request: Message(meta={"bytes": sum(t.nbytes for t in request.tensors.values())}),
        "download": lambda peer, request: Message(tensors={"t": payload}),
        "cpu": lambda peer, request: Message(meta={"cpu_s": _cpu_s()}),
    }


def _cpu_s() -> float:
    return time.process_time()  # all threads of this process, ns resolution (os.times ticks at 10 ms)


def _pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process `pid` (gRPC's pollers and executor included) to `cpus`."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:
            continue  # the thread ended since the listing: nothing left to pin


def _serve(conn: Any, mib: int, chunk_size: int) -> None:
    logging.disable(logging.WARNING)  # simulated-evidence warnings on every connection
    tune_allocator()
    payload = np.random.default_rng(1).integers(0, 256, mib << 20, dtype=np.uint8)
    credentials = PartyCredentials.create(SimulatedAttester(MEASUREMENT), POLICY, party="server", job_id=JOB)
    attested = AttestedServer(credentials, chunk_size=chunk_size)
    router = Router()
    for method, handler in _handlers(payload).items():
        attested.register(method, handler)
        router.register(method, handler)
    options = channel_options(chunk_size, Limits())
    plain = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    ExchangeServicer(router, lambda context: Peer("plain", None), chunk_size=chunk_size).add_to_server(plain)
    plain_port = plain.add_insecure_port("127.0.0.1:0")
    plain.start()
    tls = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    ExchangeServicer(router, lambda context: Peer("tls", None), chunk_size=chunk_size).add_to_server(tls)
    key_pem, cert_pem = _tls_identity()
    tls_port = tls.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    tls.start()
    conn.send((attested.start(), plain_port, tls_port, cert_pem))
    conn.recv()  # until told to stop
    attested.stop(0)
    plain.stop(0)
    tls.stop(0)


def _tls_identity() -> tuple[bytes, bytes]:
    """A self-signed EC P-384 certificate without evidence: what a TLS-only deployment uses."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
        .sign(key, hashes.SHA384())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _measure(fn: Any, server_cpu: Any) -> tuple[float, float, float]:
    """(wall s, client CPU s, server CPU s) of one transfer."""
    server_before, client_before = server_cpu(), _cpu_s()
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    return wall, _cpu_s() - client_before, server_cpu() - server_before


def _summarise(by_name: dict[str, list[tuple[float, float, float]]], mib: int) -> dict[str, Any]:
    """Medians per path, and attested/TLS and attested/plain ratios of throughput and of CPU time."""
    mbps = {name: mib / statistics.median(s[0] for s in runs) for name, runs in by_name.items()}
    cpu_ms = {
        name: {
            side: round(1e3 * statistics.median(s[i] for s in runs), 1) for i, side in ((1, "client"), (2, "server"))
        }
        for name, runs in by_name.items()
    }
    kinds = ("upload", "download")

    def per_round(kind: str, base: str) -> list[float]:
        pairs = zip(by_name[f"attested_{kind}"], by_name[f"{base}_{kind}"], strict=True)
        return [b[0] / a[0] for a, b in pairs]

    def cpu_ratio(kind: str, base: str) -> float:
        return round(sum(cpu_ms[f"{base}_{kind}"].values()) / sum(cpu_ms[f"attested_{kind}"].values()), 3)

    figures: dict[str, Any] = {}
    for base in ("tls", "plain"):
        ranges = {kind: per_round(kind, base) for kind in kinds}
        figures[f"ratio_vs_{base}"] = {
            kind: round(mbps[f"attested_{kind}"] / mbps[f"{base}_{kind}"], 3) for kind in kinds
        }
        figures[f"ratio_vs_{base}_range_per_round"] = {
            k: [round(min(r), 3), round(max(r), 3)] for k, r in ranges.items()
        }
        figures[f"cpu_ratio_{base}_vs_attested"] = {kind: cpu_ratio(kind, base) for kind in kinds}
    return {
        **figures,
        "throughput_mb_s": {name: round(value, 1) for name, value in mbps.items()},
        # Where TLS costs: plain -> tls is record protection; tls -> attested is the
        # session-token interceptor and admission, the only things attestation adds per call.
        "cpu_ms_per_transfer": cpu_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=30)
    parser.add_argument("--chunk-mib", type=float, default=4)
    args = parser.parse_args()
    chunk_size = int(args.chunk_mib * (1 << 20))
    logging.disable(logging.WARNING)
    tune_allocator()

    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(theirs, args.mib, chunk_size), daemon=True)
    server.start()
    attested_port, plain_port, tls_port, tls_cert = ours.recv()
    try:
        credentials = PartyCredentials.create(SimulatedAttester(MEASUREMENT), POLICY, party="client", job_id=JOB)
        target = f"127.0.0.1:{attested_port}"
        client = AttestedClient(target, credentials, chunk_size=chunk_size)
        plain_channel = grpc.insecure_channel(f"127.0.0.1:{plain_port}", options=channel_options(chunk_size, Limits()))
        plain_rpc = exchange_callable(plain_channel)
        tls_channel = grpc.secure_channel(
            f"127.0.0.1:{tls_port}",
            grpc.ssl_channel_credentials(root_certificates=tls_cert),
            options=[*channel_options(chunk_size, Limits()), ("grpc.ssl_target_name_override", TLS_NAME)],
        )
        tls_rpc = exchange_callable(tls_channel)
        tensor = np.random.default_rng(2).integers(0, 256, args.mib << 20, dtype=np.uint8)
        upload, empty = Message(tensors={"t": tensor}), Message()

        runs: dict[str, Any] = {
            "attested_upload": lambda: client.call("upload", upload),
            "tls_upload": lambda: call(tls_rpc, "upload", upload, chunk_size=chunk_size),
            "plain_upload": lambda: call(plain_rpc, "upload", upload, chunk_size=chunk_size),
            "attested_download": lambda: client.call("download", empty),
            "tls_download": lambda: call(tls_rpc, "download", empty, chunk_size=chunk_size),
            "plain_download": lambda: call(plain_rpc, "download", empty, chunk_size=chunk_size),
        }

        def server_cpu() -> float:
            return float(call(plain_rpc, "cpu", empty).meta["cpu_s"])

        for fn in runs.values():  # warm up: connections, BDP estimates, allocator
            fn()
        everywhere = os.sched_getaffinity(0)
        layouts = {"shared": (everywhere, everywhere)}
        if len(everywhere) >= 2:  # one core each, as on separate hosts
            first, second, *_ = sorted(everywhere)
            layouts["pinned"] = ({first}, {second})
        samples = {layout: {name: [] for name in runs} for layout in layouts}
        names = list(runs)
        for round_ in range(args.rounds):
            for layout, (client_cpus, server_cpus) in layouts.items():
                _pin(os.getpid(), client_cpus)
                _pin(server.pid, server_cpus)
                # Rotate the order each round so no path always runs first or last.
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    samples[layout][name].append(_measure(runs[name], server_cpu))
        _pin(os.getpid(), everywhere)
        _pin(server.pid, everywhere)
        figures = {layout: _summarise(by_name, args.mib) for layout, by_name in samples.items()}

        probe_ms, verify_ms, total_ms = [], [], []
        for _ in range(args.connections):
            start = time.perf_counter()
            probed = fetch_certificate("127.0.0.1", attested_port)
            probed_at = time.perf_counter()
            verify_server_certificate(probed, policy=POLICY)
            verified_at = time.perf_counter()
            probe_ms.append((probed_at - start) * 1e3)
            verify_ms.append((verified_at - probed_at) * 1e3)
            fresh = AttestedClient(target, credentials)
            start = time.perf_counter()
            fresh.connect()  # probe + verify + pinned channel + nonce + admission
            total_ms.append((time.perf_counter() - start) * 1e3)
            fresh.close()
        client.close()
        plain_channel.close()
        tls_channel.close()
    finally:
        ours.send("stop")
        server.join(10)

    result = {
        "tensor_mib": args.mib,
        "chunk_mib": args.chunk_mib,
        "rounds": args.rounds,
        "throughput_target_ratio_vs_tls": THROUGHPUT_TARGET,
        # shared: client and server processes share every core with each other (and with
        # whatever else runs); pinned: one core each, as on separate hosts.
        **{f"ratio_attested_vs_tls_{layout}": figures[layout]["ratio_vs_tls"] for layout in figures},
        **{f"ratio_attested_vs_plain_{layout}": figures[layout]["ratio_vs_plain"] for layout in figures},
        "layouts": figures,
        "connection_setup_ms": {
            "connections": args.connections,
            "median_total": round(statistics.median(total_ms), 2),
            "median_probe": round(statistics.median(probe_ms), 2),
            "median_verify": round(statistics.median(verify_ms), 2),
            "p90_total": round(sorted(total_ms)[int(0.9 * (len(total_ms) - 1))], 2),
        },
        "connection_setup_target_ms": 50,
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
