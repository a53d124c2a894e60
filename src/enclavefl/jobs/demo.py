"""`enclavefl demo`: one small horizontal and one small vertical job on scikit-learn's bundled
data, in INSECURE simulation mode, each party its own attested process."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from enclavefl.data.tabular import load_sklearn
from enclavefl.jobs.launcher import RunResult
from enclavefl.jobs.progress import run_with_progress
from enclavefl.seal.keys import create_key_file

DEMO_KEY = "demo.key"  # INSECURE file key: the demo has no TEE to seal with

SIMULATED_POLICY = {
    "verify_mr_enclave": "off",
    "verify_mr_signer": "off",
    "verify_isv_prod_id": "off",
    "verify_isv_svn": "off",
    "sgx_mrs": [],
    "allowed_tcb_status": ["UpToDate"],
    "allow_debug": False,
    "allow_simulated": True,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_csv(path: Path, ids: np.ndarray, X: np.ndarray, y: np.ndarray | None) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["id"] + (["y"] if y is not None else []) + [f"x{i}" for i in range(X.shape[1])]
        writer.writerow(header)
        for row in range(X.shape[0]):
            label = [int(y[row])] if y is not None else []
            writer.writerow([ids[row], *label, *(f"{v:.6g}" for v in X[row])])


def _tee() -> dict[str, Any]:
    return {"attester": "simulated", "allow_simulated_insecure": True, "verify": "two-way"}


def write_hfl_demo(work: Path, *, seed: int = 0) -> Path:
    """Digits (1,797 images, 10 classes): two workers with IID halves, 20% held out on the server."""
    table = load_sklearn("digits")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(table.y))  # type: ignore[arg-type]
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    halves = np.array_split(train, 2)
    for name, rows in (("worker-a", halves[0]), ("worker-b", halves[1]), ("test", test)):
        _write_csv(work / f"digits_{name}.csv", table.ids[rows], table.X[rows], table.y[rows])  # type: ignore[index]
    job = {
        "job": {"name": "demo-hfl-digits", "mode": "hfl", "seed": seed},
        "parties": [
            {"name": "server", "role": "server", "address": f"127.0.0.1:{free_port()}"},
            *({"name": w, "role": "worker", "data": {"kind": "csv", "path": f"digits_{w}.csv", "label": "y"}}
              for w in ("worker-a", "worker-b")),
        ],
        "tee": _tee(),
        "policy": "policy.json",
        "model": {"name": "mlp", "args": {"in_features": table.X.shape[1], "hidden": [64], "out_features": 10}},
        "strategy": {"name": "fedavg", "rounds": 8, "local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "evaluation": {"where": "server", "data": {"kind": "csv", "path": "digits_test.csv", "label": "y"},
                       "every": 1, "metrics": ["accuracy", "logloss"]},
        "output": {"dir": "out-hfl", "plot": True},
    }
    path = work / "demo_hfl.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def write_vfl_demo(work: Path, *, seed: int = 0) -> Path:
    """Breast cancer (569 rows, 30 columns): the leader holds labels and 10 columns, the follower 20."""
    table = load_sklearn("breast_cancer")
    _write_csv(work / "breast_leader.csv", table.ids, table.X[:, :10], table.y)
    rng = np.random.default_rng(seed)
    # The follower's own order: alignment restores it.
    follower_rows = rng.permutation(len(table.y))  # type: ignore[arg-type]
    _write_csv(work / "breast_follower.csv", table.ids[follower_rows], table.X[follower_rows, 10:], None)
    job = {
        "job": {"name": "demo-vfl-breast", "mode": "vfl", "seed": seed},
        "parties": [
            {"name": "leader", "role": "leader", "address": f"127.0.0.1:{free_port()}",
             "data": {"kind": "csv", "path": "breast_leader.csv", "label": "y"}},
            {"name": "follower", "role": "follower",
             "data": {"kind": "csv", "path": "breast_follower.csv"}},
        ],
        "tee": _tee(),
        "policy": "policy.json",
        "model": {"bottom": {"name": "bottom_mlp", "args": {"hidden": [16], "out_features": 8}},
                  "top": {"name": "top_mlp", "args": {"hidden": [16], "out_features": 1}}},
        "training": {"alignment": "ecdh-psi", "epochs": 10, "batch_size": 32, "lr": 0.01, "optimizer": "adam",
                     "validation_fraction": 0.2, "metrics": ["accuracy", "auc", "logloss"]},
        # Sealed alignment, checkpoints and exported model halves (`enclavefl predict` reads them).
        "storage": {"checkpoint_dir": "out-vfl/checkpoints", "key": f"file:{DEMO_KEY}", "checkpoint_every": 50},
        "output": {"dir": "out-vfl", "plot": True},
    }
    path = work / "demo_vfl.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run_demo(work: Path) -> list[RunResult]:
    """Write both demo jobs under `work` and run them; returns their results."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "policy.json").write_text(json.dumps(SIMULATED_POLICY, indent=2))
    if not (work / DEMO_KEY).exists():
        create_key_file(work / DEMO_KEY)
    jobs = [write_hfl_demo(work), write_vfl_demo(work)]
    return [run_with_progress(job) for job in jobs]
