"""Attested channel vs plain gRPC: tensor throughput and connection set-up, side by side.

A server process hosts the same Exchange service twice: behind the attested channel
(RA-TLS + admission + session interceptor, simulated evidence) and on a plain insecure
gRPC port, with the same chunking and handlers. The client alternates between the two
(upload: a tensor to the server; download: a tensor back), so machine noise hits both.
Besides wall-clock throughput it reports the CPU time both processes spent per transfer,
which a busy machine disturbs less. Both processes use `tune_allocator()`, as parties
should. Prints one JSON object.

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
from typing import Any

import grpc
import numpy as np

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


def _handlers(payload: np.ndarray) -> dict[str, Any]:
    return {
        "upload": lambda peer, request: Message(meta={"bytes": sum(t.nbytes for t in request.tensors.values())}),
        "download": lambda peer, request: Message(tensors={"t": payload}),
        "cpu": lambda peer, request: Message(meta={"cpu_s": _cpu_s()}),
    }


def _cpu_s() -> float:
    user, system, *_ = os.times()
    return user + system


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
    conn.send((attested.start(), plain_port))
    conn.recv()  # until told to stop
    attested.stop(0)
    plain.stop(0)


def _measure(fn: Any, server_cpu: Any) -> tuple[float, float, float]:
    """(wall s, client CPU s, server CPU s) of one transfer."""
    server_before, client_before = server_cpu(), _cpu_s()
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    return wall, _cpu_s() - client_before, server_cpu() - server_before


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
    attested_port, plain_port = ours.recv()
    try:
        credentials = PartyCredentials.create(SimulatedAttester(MEASUREMENT), POLICY, party="client", job_id=JOB)
        target = f"127.0.0.1:{attested_port}"
        client = AttestedClient(target, credentials, chunk_size=chunk_size)
        plain_channel = grpc.insecure_channel(f"127.0.0.1:{plain_port}", options=channel_options(chunk_size, Limits()))
        plain_rpc = exchange_callable(plain_channel)
        tensor = np.random.default_rng(2).integers(0, 256, args.mib << 20, dtype=np.uint8)
        upload, empty = Message(tensors={"t": tensor}), Message()

        runs: dict[str, Any] = {
            "attested_upload": lambda: client.call("upload", upload),
            "plain_upload": lambda: call(plain_rpc, "upload", upload, chunk_size=chunk_size),
            "attested_download": lambda: client.call("download", empty),
            "plain_download": lambda: call(plain_rpc, "download", empty, chunk_size=chunk_size),
        }

        def server_cpu() -> float:
            return float(call(plain_rpc, "cpu", empty).meta["cpu_s"])

        for fn in runs.values():  # warm up: connections, BDP estimates, allocator
            fn()
        samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                samples[name].append(_measure(fn, server_cpu))
        mbps = {name: args.mib / statistics.median(s[0] for s in runs_) for name, runs_ in samples.items()}
        cpu_ms = {
            name: {
                "client": round(1e3 * statistics.median(s[1] for s in runs_), 1),
                "server": round(1e3 * statistics.median(s[2] for s in runs_), 1),
            }
            for name, runs_ in samples.items()
        }

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
    finally:
        ours.send("stop")
        server.join(10)

    result = {
        "tensor_mib": args.mib,
        "chunk_mib": args.chunk_mib,
        "rounds": args.rounds,
        "throughput_mb_s": {name: round(value, 1) for name, value in mbps.items()},
        "ratio_attested_vs_plain": {
            "upload": round(mbps["attested_upload"] / mbps["plain_upload"], 3),
            "download": round(mbps["attested_download"] / mbps["plain_download"], 3),
        },
        "throughput_target_ratio": 0.85,
        "cpu_ms_per_transfer": cpu_ms,
        "cpu_ratio_plain_vs_attested": {
            kind: round(sum(cpu_ms[f"plain_{kind}"].values()) / sum(cpu_ms[f"attested_{kind}"].values()), 3)
            for kind in ("upload", "download")
        },
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
