"""Horizontal FL under an unauthenticated flood (issue 12, item 1).

The same fedavg job (3 worker processes, an MLP on random data) runs twice against a
parameter server in this process: once unloaded, once while a separate process holds
`--calls` stalled unauthenticated calls open (Health/Check calls whose request never
comes, re-opened whenever the server ends one, and `--reopen-s` after the server refused
it; over 10 connections from ::1, the workers connecting from 127.0.0.1). Per round after
the first (which also waits for the workers to start) it reports wall time loaded /
unloaded; the target is every round within 1.2x; unloaded and loaded runs alternate
`--repeats` times and the ratios are of per-round medians; `unloaded_round_spread` (slowest
/ fastest unloaded repeat of each round) shows how much of a ratio the machine's own noise is.

The flood process runs at nice 19 relative to the job (`--flood-nice`): an attacker's CPU
is on its own machines, and the rounds are to measure what the flood costs the SERVER, not
the CPU a co-located attacker process takes from the workers. So that a flood that barely
floods cannot pass, the output also has the flood's rates while the job ran (calls opened
and refused per second, the flooder's own CPU time), the server process's CPU time with
and without the flood (independent of the machine's other load) and per refused call,
and the time of one fresh admission while the flood is held. `refusals_only` is the
server and the flood alone (`--refusals-s`, the flood at full rate): the server's CPU per
refused call, which depends little on what else the machine runs. On a machine that others
load, run the bench itself at a lower niceness and the flood at theirs, e.g.
`nice -n -15 python bench/bench_flood.py --flood-nice 15`.

    python bench/bench_flood.py [--calls 1000] [--rounds 6] [--rows 4096] [--width 256] [--reopen-s 1]
                                [--repeats 2] [--flood-nice 19] [--refusals-s 10]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flood import StalledFlood  # noqa: E402  (tests/flood.py: the same flood the tests use)

from enclavefl.hfl.server import ParameterServer  # noqa: E402
from enclavefl.hfl.registry import make_strategy  # noqa: E402
from enclavefl.hfl.worker import Worker  # noqa: E402
from enclavefl.models import mlp  # noqa: E402
from enclavefl.net.admission import PartyCredentials  # noqa: E402
from enclavefl.net.client import AttestedClient  # noqa: E402
from enclavefl.net.server import AttestedServer  # noqa: E402
from enclavefl.tee.attesters import SimulatedAttester  # noqa: E402
from enclavefl.tee.measure import Measurement  # noqa: E402
from enclavefl.tee.policy import Policy  # noqa: E402

MEASUREMENT = Measurement(hashlib.sha256(b"bench flood enclave").digest(), hashlib.sha256(b"bench signer").digest())
POLICY = Policy.from_values(mr_enclave=MEASUREMENT.mr_enclave, allow_simulated=True)
JOB = "bench-flood"
SPAWN = mp.get_context("spawn")
WORKERS = 3


def _credentials(party: str) -> PartyCredentials:
    return PartyCredentials.create(SimulatedAttester(MEASUREMENT), POLICY, party=party, job_id=JOB)


def _data(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g), torch.randint(0, 10, (rows,), generator=g)


def _model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return mlp(width, (width, width), 10)


def _worker(port: int, party: str, seed: int, rows: int, width: int) -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    client = AttestedClient(f"127.0.0.1:{port}", _credentials(party))
    Worker.for_model(client, _model(width), _data(rows, width, seed), batch_size=64, lr=0.05, seed=seed).run()


def _flood(port: int, calls: int, reopen_s: float, nice: int, ready: Any, stop: Any, out: Any) -> None:
    logging.disable(logging.WARNING)
    # An attacker's own CPU is on its own machines: here it yields to the job's processes.
    os.nice(nice)
    flood = StalledFlood(f"[::1]:{port}", calls=calls, connections=10, reopen_delay_s=reopen_s).start()
    deadline = time.monotonic() + 60
    while flood.opened < calls and time.monotonic() < deadline:
        time.sleep(0.05)
    ready.set()
    # Rates over the time the job runs: at nice 19 the flood gets only the CPU the job leaves,
    # so these show how hard it really pushed.
    started, opened, refused = time.monotonic(), flood.opened, flood.ended["RESOURCE_EXHAUSTED"]
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    held = []
    while not stop.wait(0.5):
        held.append(flood.held)
    seconds = time.monotonic() - started
    opened, refused = flood.opened - opened, flood.ended["RESOURCE_EXHAUSTED"] - refused
    after = resource.getrusage(resource.RUSAGE_SELF)
    out.send({
        **flood.stop(),
        "open_at_attacker_median": statistics.median(held) if held else None,
        "held_s": round(seconds, 3),
        "opened_per_s": round(opened / seconds, 1),
        "refused_per_s": round(refused / seconds, 1),
        "flooder_cpu_s": round(after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, 3),
        "nice": os.nice(0),
    })  # fmt: skip


def _job(rounds: int, rows: int, width: int, calls: int, reopen_s: float, nice: int) -> dict[str, Any]:
    server = AttestedServer(_credentials("server"), host="[::]")
    records: list[dict[str, Any]] = []
    ps = ParameterServer(
        server, make_strategy("fedavg", _model(width)), workers=[f"w{i}" for i in range(WORKERS)], total=rounds,
        round_timeout_s=600, on_metrics=records.append,
    )  # fmt: skip
    port = server.start()
    result: dict[str, Any] = {}
    flood = None
    if calls:
        ready, stop = SPAWN.Event(), SPAWN.Event()
        ours, theirs = SPAWN.Pipe()
        flood = SPAWN.Process(target=_flood, args=(port, calls, reopen_s, nice, ready, stop, theirs), daemon=True)
        flood.start()
        if not ready.wait(90):
            raise RuntimeError("the flood did not open its calls")
    workers = [
        SPAWN.Process(target=_worker, args=(port, f"w{i}", i, rows, width), daemon=True) for i in range(WORKERS)
    ]
    for process in workers:
        process.start()
    try:
        cpu, refused = resource.getrusage(resource.RUSAGE_SELF), server._guard.refused
        summary = ps.run()
        after = resource.getrusage(resource.RUSAGE_SELF)
        result["refused_during_job"] = server._guard.refused - refused
        # This process is the server (workers and flood are other processes): its CPU time
        # is what the flood costs the server, whatever else the machine runs.
        result["server_cpu_s"] = round(after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, 3)
        started = time.monotonic()
        newcomer = AttestedClient(f"127.0.0.1:{port}", _credentials("newcomer"))
        newcomer.connect()
        newcomer.close()
        result["fresh_admission_s"] = round(time.monotonic() - started, 4)
    finally:
        for process in workers:
            process.join(60)
        if flood is not None:
            stop.set()
            result["flood"] = ours.recv()
            flood.join(30)
        result["open_calls_refused_by_guard"] = server._guard.refused
        result["open_calls_refused_without_a_thread"] = server._guard.refused_inline
        server.stop(1.0)
    result["version"] = summary["version"]
    result["round_wall_s"] = [round(r["wall_s"], 4) for r in records if r["event"] == "round"]
    return result


def _refusals_only(calls: int, reopen_s: float, seconds: float) -> dict[str, Any]:
    """The server and the flood alone for `seconds` (the flood at the bench's own niceness:
    no job to yield to): the server's CPU per refused call at the flood's full rate."""
    server = AttestedServer(_credentials("server"), host="[::]")
    port = server.start()
    ready, stop = SPAWN.Event(), SPAWN.Event()
    ours, theirs = SPAWN.Pipe()
    flood = SPAWN.Process(target=_flood, args=(port, calls, reopen_s, 0, ready, stop, theirs), daemon=True)
    flood.start()
    try:
        if not ready.wait(90):
            raise RuntimeError("the flood did not open its calls")
        time.sleep(1.0)  # past the first wave of refusals
        cpu, refused, started = resource.getrusage(resource.RUSAGE_SELF), server._guard.refused, time.monotonic()
        time.sleep(seconds)
        after, refused, elapsed = (
            resource.getrusage(resource.RUSAGE_SELF), server._guard.refused - refused, time.monotonic() - started
        )
    finally:
        stop.set()
        flooded = ours.recv()
        flood.join(30)
        server.stop(1.0)
    used = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    return {
        "seconds": round(elapsed, 3),
        "refused_per_s": round(refused / elapsed, 1),
        "server_cpu_s_per_s": round(used / elapsed, 4),
        "server_cpu_us_per_refused_call": round(1e6 * used / max(1, refused), 1),
        "flood": flooded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="unloaded and loaded runs, alternating")
    parser.add_argument("--reopen-s", type=float, default=1.0, help="a refused stalled call is opened again after this")
    parser.add_argument(
        "--flood-nice", type=int, default=19,
        help="niceness the flood process adds to the bench's own (see the module docstring)",
    )  # fmt: skip
    parser.add_argument(
        "--refusals-s", type=float, default=10.0,
        help="also run the server and the flood alone this long (0: not) for the CPU per refused call",
    )  # fmt: skip
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    refusals = _refusals_only(args.calls, args.reopen_s, args.refusals_s) if args.refusals_s > 0 else None
    # Unloaded and loaded runs alternate (A B A B ...), so that a change in what else the
    # machine runs hits both; each round's ratio is of the medians over the repeats.
    unloaded, loaded = [], []
    for _ in range(args.repeats):
        unloaded.append(_job(args.rounds, args.rows, args.width, 0, args.reopen_s, args.flood_nice))
        loaded.append(_job(args.rounds, args.rows, args.width, args.calls, args.reopen_s, args.flood_nice))

    def per_round(runs: list[dict[str, Any]]) -> list[float]:
        # Round 1 also waits for the worker processes to start (import torch, attest): warm-up.
        return [statistics.median(run["round_wall_s"][i] for run in runs) for i in range(1, args.rounds)]

    base, flooded = per_round(unloaded), per_round(loaded)
    ratios = [b / a for a, b in zip(base, flooded, strict=True)]
    # The control: how far the unloaded repeats of one round differ from each other (slowest /
    # fastest). A spread near 1.2 means the machine's noise alone can fail the target.
    spread = [
        max(run["round_wall_s"][i] for run in unloaded) / min(run["round_wall_s"][i] for run in unloaded)
        for i in range(1, args.rounds)
    ]
    cpu = [round(statistics.median(run["server_cpu_s"] for run in runs), 3) for runs in (unloaded, loaded)]
    with open("/proc/loadavg") as f:
        load = [float(x) for x in f.read().split()[:3]]
    print(json.dumps({
        "benchmark": "hfl fedavg under a flood of stalled unauthenticated calls",
        "command": "python bench/bench_flood.py " + " ".join(sys.argv[1:]),
        "workers": WORKERS, "rounds": args.rounds, "repeats": args.repeats, "stalled_calls": args.calls,
        "load_average_at_end": load,
        "unloaded": unloaded, "loaded": loaded,
        "median_round_wall_s_unloaded": [round(x, 4) for x in base],
        "median_round_wall_s_loaded": [round(x, 4) for x in flooded],
        "round_ratio_after_warm_up": [round(x, 4) for x in ratios],
        "max_round_ratio": round(max(ratios), 4),
        "unloaded_round_spread": [round(x, 4) for x in spread],
        "median_round_ratio": round(statistics.median(ratios), 4),
        "server_cpu_s_unloaded": cpu[0], "server_cpu_s_loaded": cpu[1],
        "server_cpu_ratio": round(cpu[1] / cpu[0], 4),
        # The server's cost per refused call, from its CPU time with and without the flood.
        "server_cpu_us_per_refused_call": round(
            1e6 * (cpu[1] - cpu[0]) / max(1, statistics.median(run["refused_during_job"] for run in loaded)), 1
        ),
        "flood_opened_per_s": statistics.median(run["flood"]["opened_per_s"] for run in loaded),
        "flood_refused_per_s": statistics.median(run["flood"]["refused_per_s"] for run in loaded),
        "flooder_nice_over_the_job": args.flood_nice,
        "refusals_only": refusals,
        "job_nice": os.nice(0),
        "target_max_round_ratio": 1.2,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
