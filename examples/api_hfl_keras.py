"""Bring your Keras model to a horizontal federated job (needs pip install 'enclavefl[tf]').

Three workers each hold a third of scikit-learn's breast-cancer data and train a Keras
model with `model.fit` (Adam); a parameter server averages them with FedAvg, matching
the weights by their Keras variable names. Every party attests (here in INSECURE
simulation mode: no TEE needed) before a byte of the model moves.

    python examples/api_hfl_keras.py --out runs/api-hfl-keras

writes the job file it runs (job.yaml), the usual summary.json, metrics.jsonl and each
party's log under --out. The job names this module's functions (`model:` with
`framework: keras`, `trainer:`, the workers' `data: {kind: python}`), so the same job
also runs with `enclavefl run` as long as this directory is on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np

from enclavefl import KerasTrainer

HERE = Path(__file__).resolve().parent


def load_part(part: int, parts: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Worker `part`'s rows: standardized features and 0/1 labels (a seeded split of the 569 rows)."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    rows = np.array_split(np.random.default_rng(seed).permutation(len(labels)), parts)[part]
    return features[rows].astype(np.float32), labels[rows].astype(np.float32)


def make_model() -> keras.Model:
    """The model every party builds (the server's initial weights win at join). Named layers
    give the weights stable names ("hidden/kernel", ...)."""
    return keras.Sequential([
        keras.Input((30,)),
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(1, name="logit"),
    ])  # fmt: skip


def make_trainer(data: Any, model: keras.Model, **_: Any) -> KerasTrainer:
    """The job's `trainer:`: called in each worker with its data spec and the job's model."""
    features, labels = load_part(**data.args)
    held = len(labels) // 5  # the first fifth of this worker's rows is its evaluation set
    return KerasTrainer(
        model,
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        optimizer=keras.optimizers.Adam(1e-2),
        train_data=(features[held:], labels[held:]),
        eval_data=(features[:held], labels[:held]),
        batch_size=32,
        local_epochs=2,
    )


def job_file(out: Path, *, rounds: int, port: int) -> dict[str, Any]:
    workers = [
        {"name": f"worker-{i}", "role": "worker",
         "data": {"kind": "python", "factory": "api_hfl_keras:load_part", "args": {"part": i}}}
        for i in range(3)
    ]  # fmt: skip
    return {
        "job": {"name": "api-hfl-keras", "mode": "hfl", "seed": 0},
        "parties": [{"name": "server", "role": "server", "address": f"127.0.0.1:{port}"}, *workers],
        "tee": {"attester": "simulated", "allow_simulated_insecure": True},  # INSECURE: no TEE
        "policy": str(HERE / "policy-sim.json"),
        "code": ["api_hfl_keras"],  # this module: imported by the parties and measured with the job
        "model": {"framework": "keras", "factory": "api_hfl_keras:make_model"},
        "trainer": "api_hfl_keras:make_trainer",
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
