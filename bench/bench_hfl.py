"""Horizontal FL over the attested channel: framework overhead and parameter-server memory.

Three measurements in one run, each a ratio of things measured side by side:

* fedavg: round wall time (server: from publishing round r to closing it) over the
  slowest worker's local training time in that round. ResNet-20 on CIFAR-shaped random
  data, 2 worker processes (one torch thread each), 1 local epoch of `--samples`.
* sync-sgd: step wall time over the slowest worker's forward+backward time, ResNet-20,
  `--batch` per worker, 2 worker processes.
* memory: a parameter server in its own process with `--mem-workers` workers (threads of
  this process) and an MLP of about `--mem-mib` MiB, 2 fedavg rounds: peak RSS growth
  over the server's RSS once built (model, strategy and served state), in model sizes;
  once with glibc's default malloc settings and once with `bound_allocator()`, which
  `enclavefl party` applies to a parameter server.

Evaluation and checkpoints are off: the ratios are those of the training path.
Prints one JSON object.

    python bench/bench_hfl.py [--samples 2048] [--rounds 2] [--batch 128] [--steps 10]
                              [--mem-workers 16] [--mem-mib 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import resource
import statistics
import sys
import threading
import time
from typing import Any

import torch

from enclavefl.hfl.server import ParameterServer
from enclavefl.hfl.registry import make_strategy
from enclavefl.hfl.worker import Worker
from enclavefl.models import mlp, resnet_v2
from enclavefl.net.admission import PartyCredentials
from enclavefl.net.allocator import bound_allocator
from enclavefl.net.client import AttestedClient
from enclavefl.net.server import AttestedServer
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.measure import Measurement
from enclavefl.tee.policy import Policy

MEASUREMENT = Measurement(hashlib.sha256(b"bench hfl enclave").digest(), hashlib.sha256(b"bench signer").digest())
POLICY = Policy.from_values(mr_enclave=MEASUREMENT.mr_enclave, allow_simulated=True)
JOB = "bench-hfl"
SPAWN = mp.get_context("spawn")


def _credentials(party: str) -> PartyCredentials:
    return PartyCredentials.create(SimulatedAttester(MEASUREMENT), POLICY, party=party, job_id=JOB)


def _cifar(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 3, 32, 32, generator=g), torch.randint(0, 10, (samples,), generator=g)


def _resnet_worker(port: int, party: str, seed: int, samples: int, batch: int) -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    client = AttestedClient(f"127.0.0.1:{port}", _credentials(party))
    Worker.for_model(
        client, resnet_v2(20), _cifar(samples, seed), batch_size=batch, lr=0.05, momentum=0.9, seed=seed
    ).run()


def _federate(strategy_name: str, hyper: dict[str, Any], total: int, samples: int, batch: int) -> list[dict[str, Any]]:
    """Server here, two worker processes; returns the server's round/step records."""
    torch.manual_seed(0)
    strategy = make_strategy(strategy_name, resnet_v2(20), **hyper)
    server = AttestedServer(_credentials("server"), max_workers=8)
    records: list[dict[str, Any]] = []
    ps = ParameterServer(
        server, strategy, workers=["w0", "w1"], total=total, round_timeout_s=600, on_metrics=records.append
    )
    port = server.start()
    workers = [
        SPAWN.Process(target=_resnet_worker, args=(port, f"w{i}", i, samples, batch), daemon=True) for i in range(2)
    ]
    for process in workers:
        process.start()
    try:
        ps.run()
    finally:
        for process in workers:
            process.join(60)
        server.stop(1.0)
    return [r for r in records if r["event"] in ("round", "step")]


def _ratios(records: list[dict[str, Any]], skip: int) -> dict[str, Any]:
    ratios = [r["wall_s"] / r["max_compute_s"] for r in records]
    kept = ratios[skip:]
    return {
        "per_update": [round(x, 4) for x in ratios],
        "median_ratio": round(statistics.median(kept), 4),
        "median_wall_s": round(statistics.median(r["wall_s"] for r in records[skip:]), 4),
        "median_slowest_compute_s": round(statistics.median(r["max_compute_s"] for r in records[skip:]), 4),
        "warm_up_updates_left_out": skip,
    }


# -- memory ------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    """VmHWM: the kernel's exact high-water mark of this process's RSS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _memory_server(conn: Any, workers: int, width: int, bounded: bool) -> None:
    logging.disable(logging.WARNING)
    if bounded:
        bound_allocator()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mlp(width, (4 * width, 2 * width), 2)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    server = AttestedServer(_credentials("server"), max_workers=workers + 8)
    names = [f"w{i}" for i in range(workers)]
    ps = ParameterServer(server, make_strategy("fedavg", model), workers=names, total=2, round_timeout_s=600)
    conn.send(server.start())
    baseline = _rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    ps.run()
    conn.send({"model_bytes": model_bytes, "baseline": baseline, "peak": _peak_rss()})
    conn.recv()
    server.stop(1.0)


def _memory(workers: int, mib: int, bounded: bool) -> dict[str, Any]:
    # MLP width -> 4w -> 2w -> 2 has about 12 w^2 parameters.
    width = int((mib * 2**20 / 4 / 12) ** 0.5)
    ours, theirs = SPAWN.Pipe()
    process = SPAWN.Process(target=_memory_server, args=(theirs, workers, width, bounded), daemon=True)
    process.start()
    port = ours.recv()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            client = AttestedClient(f"127.0.0.1:{port}", _credentials(f"w{i}"))
            g = torch.Generator().manual_seed(i)
            data = (torch.randn(4, width, generator=g), torch.randint(0, 2, (4,), generator=g))
            Worker.for_model(client, mlp(width, (4 * width, 2 * width), 2), data, batch_size=4, lr=0.01).run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = ours.recv()
    ours.send("stop")
    process.join(30)
    if errors:
        raise errors[0]
    model = result["model_bytes"]
    return {
        "server_malloc": "bound_allocator()" if bounded else "glibc defaults",
        "workers": workers,
        "model_mib": round(model / 2**20, 1),
        "baseline_rss_mib": round(result["baseline"] / 2**20, 1),
        "peak_rss_mib": round(result["peak"] / 2**20, 1),
        "growth_in_model_sizes": round((result["peak"] - result["baseline"]) / model, 2),
        "target_growth_in_model_sizes": 4.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mem-workers", type=int, default=16)
    parser.add_argument("--mem-mib", type=int, default=64)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)

    walls = {}
    started = time.perf_counter()
    fedavg = _federate("fedavg", {}, args.rounds, args.samples, 64)
    walls["fedavg"] = time.perf_counter() - started
    sync = _federate("sync-sgd", {"lr": 0.05, "momentum": 0.9}, args.steps, args.batch * args.steps, args.batch)
    walls["sync_sgd"] = time.perf_counter() - started - walls["fedavg"]
    memory = [_memory(args.mem_workers, args.mem_mib, bounded) for bounded in (False, True)]
    walls["memory"] = time.perf_counter() - started - walls["fedavg"] - walls["sync_sgd"]
    result = {
        "fedavg_round_over_slowest_training": {
            "model": "resnet20", "workers": 2, "samples_per_worker": args.samples, "batch": 64,
            **_ratios(fedavg, skip=0), "target_ratio": 1.05,
        },
        "sync_sgd_step_over_slowest_compute": {
            "model": "resnet20", "workers": 2, "batch_per_worker": args.batch,
            **_ratios(sync, skip=2), "target_ratio": 1.25,
        },
        "ps_memory_fedavg": memory,
        "bench_wall_s": {name: round(value, 1) for name, value in walls.items()},
    }  # fmt: skip
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
