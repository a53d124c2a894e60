"""Vertical FL: a split training step over the attested channel vs the same model unsplit.

1. wide&deep at CCZoo's reference size (512 fields per party, 101 values, embeddings 32 on
   the leader and 16 on the follower), batch 256: leader and follower run as separate
   processes over the attested channel on loopback (simulated evidence), one torch
   thread each; the same model (UnsplitWideDeep) trains in one process, one thread. The
   ratio is split seconds per step over unsplit seconds per step (target <= 1.3); the
   unsplit step is timed before and after the split run, and averaged, so drift in
   machine load hits both sides.
2. Training samples per second on default_credit (FATE's hetero split: 13 columns on the
   leader, 10 on the follower, split MLP), leader and follower as processes, at batch 32
   (the CCZoo Fedlearner-in-SGX log shows about 39 samples/s: batch 32 in 0.81 s) and 256.

Throughput is the leader's per-epoch figure (training samples over the time from the
epoch's first batch to the end of its evaluation; alignment excluded); wide&deep uses the
second epoch, after warm-up. Prints one JSON object.

    python bench/bench_vfl.py [--steps 40] [--fields 512] [--pipeline-depth 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from enclavefl.data import load_fate_csv, load_wide_deep_party, make_wide_deep_data
from enclavefl.models import BottomMLP, TopMLP, UnsplitWideDeep, WideDeepFollower, WideDeepLeader
from enclavefl.net.admission import PartyCredentials
from enclavefl.net.allocator import tune_allocator
from enclavefl.net.client import AttestedClient
from enclavefl.net.server import AttestedServer
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.measure import Measurement
from enclavefl.tee.policy import Policy
from enclavefl.vfl.follower import Follower
from enclavefl.vfl.leader import Leader, SplitMlpLeader

MEASUREMENT = Measurement(hashlib.sha256(b"bench enclave").digest(), hashlib.sha256(b"bench signer").digest())
POLICY = Policy.from_values(mr_enclave=MEASUREMENT.mr_enclave, allow_simulated=True)
JOB = "bench-vfl"
SHARED = Path(os.environ.get("ENCLAVEFL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CCZOO_SAMPLES_PER_S = 32 / 0.81
WIDE_DEEP_LR = 0.05
VALIDATION_FRACTION = 0.02  # the split run evaluates every epoch: keep that small beside the steps


def _credentials(party: str) -> PartyCredentials:
    return PartyCredentials.create(SimulatedAttester(MEASUREMENT), POLICY, party=party, job_id=JOB)


def _quiet() -> None:
    torch.set_num_threads(1)
    tune_allocator()
    logging.basicConfig(level=logging.ERROR)


def _wide_deep(fields: int, sparse: bool = True) -> tuple[WideDeepLeader, WideDeepFollower]:
    torch.manual_seed(0)
    return WideDeepLeader(fields, sparse=sparse), WideDeepFollower(fields, sparse=sparse)


def _split_mlp(guest_columns: int, host_columns: int) -> tuple[SplitMlpLeader, BottomMLP]:
    torch.manual_seed(0)
    leader = SplitMlpLeader(TopMLP(32, (32,), 1), BottomMLP(guest_columns, 16, (32,)))
    return leader, BottomMLP(host_columns, 16, (32,))


def _leader_process(spec: dict[str, Any], conn: Any) -> None:
    _quiet()
    model: nn.Module
    if spec["kind"] == "wide_deep":
        party = load_wide_deep_party(spec["leader"])
        model, _ = _wide_deep(spec["fields"])
        ids, x, y = party.ids, party.x, party.y
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=WIDE_DEEP_LR)
    else:
        table = load_fate_csv(spec["leader"])
        model, _ = _split_mlp(table.num_features, spec["host_columns"])
        ids, x, y = table.ids, table.X, table.y
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    server = AttestedServer(_credentials("leader"))
    leader = Leader(
        server, followers=["follower"], X=x, y=y, ids=ids, model=model, optimizer=optimizer,
        epochs=spec["epochs"], batch_size=spec["batch_size"], alignment="tee-join",
        validation_fraction=spec["validation_fraction"], pipeline_depth=spec["pipeline_depth"],
    )  # fmt: skip
    conn.send(server.start())
    cpu = time.process_time()
    summary = leader.run()
    summary["cpu_s"] = time.process_time() - cpu
    server.stop(0)
    conn.send(summary)


def _follower_process(spec: dict[str, Any], port: int, conn: Any) -> None:
    _quiet()
    model: nn.Module
    if spec["kind"] == "wide_deep":
        party = load_wide_deep_party(spec["follower"])
        _, model = _wide_deep(spec["fields"])
        ids, x = party.ids, party.x
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=WIDE_DEEP_LR)
    else:
        table = load_fate_csv(spec["follower"])
        _, model = _split_mlp(spec["guest_columns"], table.num_features)
        ids, x = table.ids, table.X
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    client = AttestedClient(f"127.0.0.1:{port}", _credentials("follower"))
    cpu = time.process_time()
    Follower(client, X=x, ids=ids, model=model, optimizer=optimizer, alignment="tee-join").run()
    conn.send(time.process_time() - cpu)


def split_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Leader and follower processes; returns the leader's summary, with both parties' CPU seconds."""
    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    leader = context.Process(target=_leader_process, args=(spec, theirs))
    leader.start()
    port = ours.recv()
    follower_ours, follower_theirs = context.Pipe()
    follower = context.Process(target=_follower_process, args=(spec, port, follower_theirs))
    follower.start()
    summary = ours.recv()
    summary["follower_cpu_s"] = follower_ours.recv()
    leader.join()
    follower.join()
    if leader.exitcode or follower.exitcode:
        raise RuntimeError(f"split run failed: leader exit {leader.exitcode}, follower exit {follower.exitcode}")
    return summary


def unsplit_seconds_per_step(
    leader_path: str, follower_path: str, fields: int, batch_size: int, steps: int
) -> tuple[float, float]:
    """Mean wall and CPU seconds per training step of UnsplitWideDeep here (after 3 warm-up steps)."""
    lead, follow = load_wide_deep_party(leader_path), load_wide_deep_party(follower_path)
    leader, follower = _wide_deep(fields)
    model = UnsplitWideDeep(leader, [follower])
    optimizer = torch.optim.SGD(model.parameters(), lr=WIDE_DEEP_LR)
    xl, xf, y = torch.from_numpy(lead.x), torch.from_numpy(follow.x), torch.from_numpy(lead.y).float()
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(lead)))
    started = cpu = 0.0
    for step in range(steps + 3):
        if step == 3:
            started, cpu = time.perf_counter(), time.process_time()
        rows = order[(step * batch_size) % len(order) :][:batch_size]
        loss = F.binary_cross_entropy_with_logits(model(xl[rows], [xf[rows]])[:, 0], y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="wide&deep training steps per epoch")
    parser.add_argument("--fields", type=int, default=512, help="wide&deep fields per party")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pipeline-depth", type=int, default=1)
    args = parser.parse_args()
    _quiet()
    out: dict[str, Any] = {"torch_threads_per_party": 1, "cpus": os.cpu_count()}

    with tempfile.TemporaryDirectory() as tmp:
        train_rows = args.steps * args.batch_size
        rows = int(np.ceil(train_rows / (1 - VALIDATION_FRACTION))) + 1
        files = make_wide_deep_data(tmp, rows, fields_per_party=args.fields, seed=0)
        leader_path, follower_path = str(files.leader), str(files.followers[0])
        before = unsplit_seconds_per_step(leader_path, follower_path, args.fields, args.batch_size, args.steps // 2)
        summary = split_run({
            "kind": "wide_deep", "leader": leader_path, "follower": follower_path, "fields": args.fields,
            "epochs": 2, "batch_size": args.batch_size, "validation_fraction": VALIDATION_FRACTION,
            "pipeline_depth": args.pipeline_depth,
        })  # fmt: skip
        after = unsplit_seconds_per_step(leader_path, follower_path, args.fields, args.batch_size, args.steps // 2)
    unsplit = (before[0] + after[0]) / 2
    unsplit_cpu = (before[1] + after[1]) / 2
    split = args.batch_size / summary["history"][1]["samples_per_s"]
    # CPU of both parties over the whole run (alignment and evaluations included) per training step.
    split_cpu = (summary["cpu_s"] + summary["follower_cpu_s"]) / (summary["iterations"] - 2)
    out["wide_deep"] = {
        "fields_per_party": args.fields,
        "batch_size": args.batch_size,
        "steps_timed": summary["train_rows"] // args.batch_size,
        "pipeline_depth": args.pipeline_depth,
        "split_s_per_step": round(split, 4),
        "unsplit_s_per_step": round(unsplit, 4),
        "unsplit_s_per_step_before_after": [round(before[0], 4), round(after[0], 4)],
        "split_over_unsplit": round(split / unsplit, 3),
        "target_ratio": 1.3,
        "split_cpu_s_per_step_both_parties": round(split_cpu, 4),
        "unsplit_cpu_s_per_step": round(unsplit_cpu, 4),
        "cpu_split_over_unsplit": round(split_cpu / unsplit_cpu, 3),
    }

    guest = SHARED / "tabular" / "default_credit_hetero_guest.csv"
    host = SHARED / "tabular" / "default_credit_hetero_host.csv"
    if guest.exists() and host.exists():
        results: dict[str, Any] = {}
        for batch_size in (32, 256):
            summary = split_run({
                "kind": "split_mlp", "leader": str(guest), "follower": str(host), "guest_columns": 13,
                "host_columns": 10, "epochs": 1, "batch_size": batch_size, "validation_fraction": 0.2,
                "pipeline_depth": 1,
            })  # fmt: skip
            epoch = summary["history"][0]
            results[f"batch_{batch_size}"] = {
                "samples_per_s": round(epoch["samples_per_s"], 1),
                "s_per_step": round(batch_size / epoch["samples_per_s"], 5),
                "val_auc_after_1_epoch": round(epoch["val_auc"], 4),
            }
        results["cczoo_fedlearner_sgx_samples_per_s"] = round(CCZOO_SAMPLES_PER_S, 1)
        results["batch_32_over_cczoo"] = round(results["batch_32"]["samples_per_s"] / CCZOO_SAMPLES_PER_S, 1)
        out["default_credit"] = results
    else:
        out["default_credit"] = f"skipped: {guest} not found"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
