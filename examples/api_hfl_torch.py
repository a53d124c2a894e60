"""Bring your own PyTorch training loop to a horizontal federated job.

Three workers each hold a third of scikit-learn's breast-cancer data; each trains with its
own loop (Adam, a cosine learning-rate schedule, gradient clipping) over its own
DataLoader, and a parameter server averages them with FedAvg. Every party attests (here
in INSECURE simulation mode: no TEE needed) before a byte of the model moves.

    python examples/api_hfl_torch.py --out runs/api-hfl-torch

writes the job file it runs (job.yaml), the usual summary.json, metrics.jsonl and each
party's log under --out. The job file names this module's functions (`model:`,
`trainer:` and the workers' `data: {kind: python}`), so the same job also runs with
`enclavefl run`, or party by party with `enclavefl party`, as long as this directory is
on PYTHONPATH. From a script or notebook, `enclavefl.run_worker(make_trainer(...),
job=..., party=...)` runs one worker with a trainer object you built yourself.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from enclavefl import TorchTrainer

HERE = Path(__file__).resolve().parent
EPOCHS = 2


def load_part(part: int, parts: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Worker `part`'s rows: standardized features and 0/1 labels (a seeded split of the 569 rows)."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    rows = np.array_split(np.random.default_rng(seed).permutation(len(labels)), parts)[part]
    return features[rows].astype(np.float32), labels[rows].astype(np.float32)


def make_model() -> nn.Module:
    """The model every party builds (the server's initial weights win at join)."""
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 1))


class AdamTrainer(TorchTrainer):
    """Our own loop: enclavefl loads the global weights before and reads them after."""

    def train_one_round(self, config: Mapping[str, Any]) -> dict[str, float]:
        loader: DataLoader = self.train_loader  # type: ignore[assignment]
        optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * len(loader))
        self.model.train()
        total, batches = 0.0, 0
        for _ in range(EPOCHS):
            for features, labels in loader:
                features, labels = features.to(self.device), labels.to(self.device)
                optimizer.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(self.model(features).squeeze(-1), labels)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1.0)
                optimizer.step()
                scheduler.step()
                total, batches = total + float(loss.detach()), batches + 1
        return {"loss": total / batches}


def make_trainer(data: Any, model: nn.Module, *, device: torch.device) -> AdamTrainer:
    """The job's `trainer:`: called in each worker with its data spec, the job's model and its device."""
    features, labels = load_part(**data.args)
    held = len(labels) // 5  # the last fifth of this worker's rows is its evaluation set
    train = TensorDataset(torch.from_numpy(features[held:]), torch.from_numpy(labels[held:]))
    test = TensorDataset(torch.from_numpy(features[:held]), torch.from_numpy(labels[:held]))
    generator = torch.Generator().manual_seed(data.args["part"])
    return AdamTrainer(
        model,
        train_loader=DataLoader(train, batch_size=32, shuffle=True, generator=generator),
        eval_loader=DataLoader(test, batch_size=256),
        device=device,
    )


def job_file(out: Path, *, rounds: int, port: int) -> dict[str, Any]:
    workers = [
        {"name": f"worker-{i}", "role": "worker",
         "data": {"kind": "python", "factory": "api_hfl_torch:load_part", "args": {"part": i}}}
        for i in range(3)
    ]  # fmt: skip
    return {
        "job": {"name": "api-hfl-torch", "mode": "hfl", "seed": 0},
        "parties": [{"name": "server", "role": "server", "address": f"127.0.0.1:{port}"}, *workers],
        "tee": {"attester": "simulated", "allow_simulated_insecure": True},  # INSECURE: no TEE
        "policy": str(HERE / "policy-sim.json"),
        "code": ["api_hfl_torch"],  # this module: imported by the parties and measured with the job
        "model": {"name": "api_hfl_torch:make_model"},
        "trainer": "api_hfl_torch:make_trainer",
        "strategy": {"name": "fedavg", "rounds": rounds, "batch_size": 32, "lr": 0.01, "round_timeout_s": 120},
        "evaluation": {"where": "workers", "metrics": ["accuracy", "auc", "logloss"]},
        "output": {"dir": str(out), "plot": False},
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the job file and the results go")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The parties are processes of their own: they find this module on PYTHONPATH.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    job = out / "job.yaml"
    job.write_text(json.dumps(job_file(out, rounds=args.rounds, port=free_port()), indent=2))  # JSON is YAML

    from enclavefl.jobs.launcher import run_job

    result = run_job(job, out_dir=out)
    print(json.dumps(result.summary, indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
