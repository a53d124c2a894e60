"""Tensors far larger than memory budgets stream through with bounded receiver memory.

The receiver is an attested server in a subprocess (so its peak RSS is its own); the
sender produces the tensor lazily, block by block, and never holds it whole either.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from conftest import sim_credentials, sim_measurement, sim_policy

from enclavefl.net.client import AttestedClient
from enclavefl.net.tensors import LazyTensor, Message

MEASUREMENT = sim_measurement(b"big")
POLICY = sim_policy(MEASUREMENT)
BLOCK = 4 << 20
GIB = 1 << 30

RECEIVER = f"""
import hashlib, json, resource, sys, threading, time
import psutil
from enclavefl.net.admission import PartyCredentials
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import DigestSink, MemmapSink, Message
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.measure import Measurement
from enclavefl.tee.policy import Policy

m = Measurement(bytes.fromhex("{MEASUREMENT.mr_enclave.hex()}"), bytes.fromhex("{MEASUREMENT.mr_signer.hex()}"))
policy = Policy.from_values(mr_enclave=m.mr_enclave, allow_simulated=True)
def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

# File-backed pages of the memmap belong to the page cache, which the kernel reclaims; the
# process's own (anonymous) memory is what must stay bounded, so it is sampled separately.
peak_anon = [0]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], rss_anon())
        time.sleep(0.005)

sink = DigestSink() if sys.argv[1] == "digest" else MemmapSink(sys.argv[2])

def receive(peer, request):
    t = request.tensors["big"]
    if sys.argv[1] == "digest":
        digest = t.hexdigest
    else:  # read the file back in blocks, not through the mapping, to keep RSS flat
        h = hashlib.sha256()
        with open(t.filename, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        digest = h.hexdigest()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    anon = max(peak_anon[0], rss_anon())
    return Message(meta={{"digest": digest, "peak_rss": peak, "peak_anon": anon, "shape": list(t.shape)}})

server = AttestedServer(PartyCredentials.create(SimulatedAttester(m), policy, party="receiver", job_id="big"))
server.register("receive", receive, sink=sink)
port = server.start()
# Baseline once everything is imported and serving; peak RSS is measured in the handler.
baseline = {{"port": port, "baseline_rss": psutil.Process().memory_info().rss, "baseline_anon": rss_anon()}}
threading.Thread(target=sample, daemon=True).start()
print(json.dumps(baseline), flush=True)
sys.stdin.read()
server.stop(0)
"""


def blocks(total: int, digest: hashlib._Hash) -> Iterator[bytes]:
    """Distinct blocks made on the fly: a fixed pattern stamped with the block number."""
    pattern = hashlib.shake_256(b"pattern").digest(BLOCK)
    for index in range(-(-total // BLOCK)):
        size = min(BLOCK, total - index * BLOCK)
        block = index.to_bytes(8, "little") + pattern[8:size]
        digest.update(block)
        yield block


def stream_through(tmp_path: Path, total: int, sink: str, measure: str = "rss") -> tuple[dict, str, int]:
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, sink, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(receiver.stdout.readline())  # type: ignore[union-attr]
        sent = hashlib.sha256()
        lazy = LazyTensor("uint8", (total,), lambda: blocks(total, sent))
        credentials = sim_credentials("sender", MEASUREMENT, POLICY, "big")
        with AttestedClient(f"127.0.0.1:{ready['port']}", credentials) as client:
            answer = client.call("receive", Message(tensors={"big": lazy}))
    finally:
        receiver.communicate("", timeout=30)
    return answer.meta, sent.hexdigest(), answer.meta[f"peak_{measure}"] - ready[f"baseline_{measure}"]


def test_600_mib_tensor_into_a_memmap_with_bounded_receiver_memory(tmp_path: Path) -> None:
    total = 600 << 20
    meta, digest, growth = stream_through(tmp_path, total, "memmap", measure="anon")
    assert meta["digest"] == digest and meta["shape"] == [total]
    # The 3 GiB bound (1.5 GiB) scaled to 600 MiB.
    assert growth < 1.5 * GIB * total / (3 * GIB), f"receiver anonymous RSS grew by {growth / 2**20:.0f} MiB"


def test_3_gib_tensor_streams_with_bounded_receiver_memory(tmp_path: Path) -> None:
    total = 3 * GIB
    meta, digest, growth = stream_through(tmp_path, total, "digest")
    assert meta["digest"] == digest and meta["shape"] == [total]
    assert growth < 1.5 * GIB, f"receiver RSS grew by {growth / 2**20:.0f} MiB"
