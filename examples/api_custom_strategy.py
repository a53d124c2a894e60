"""A server strategy of your own, defined in this script, used by a federated job.

`NormClippedMean` averages the workers' round updates after scaling each one down to an
L2 norm of at most `max_norm` (over all its tensors), so no single worker can move the
global model by more than that in a round. It needs nothing from enclavefl but the
strategy contract (`enclavefl.hfl.contract`): `configure_round`, `aggregate`,
`state_dict` and `load_state_dict`, on numpy arrays.

    python examples/api_custom_strategy.py --out runs/api-custom-strategy

writes job.yaml (which names the strategy as `api_custom_strategy:NormClippedMean`, with
its parameters under `strategy.params`), runs it with three workers on scikit-learn's
breast-cancer data in INSECURE simulation mode, and writes the usual summary.json. From
Python, `enclavefl.serve(NormClippedMean(max_norm=0.1), job=..., party="server")` runs the
server with an instance instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from enclavefl import ConfigError, Contribution

HERE = Path(__file__).resolve().parent


class NormClippedMean:
    """FedAvg over updates clipped to an L2 norm of `max_norm` each (unweighted: a worker's
    claimed example count cannot buy it influence)."""

    name = "clipped-mean"
    kind = "update"

    class Params(BaseModel):
        """What the job file may set under strategy.params (checked before the run starts)."""

        max_norm: float = Field(1.0, gt=0)

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = float(max_norm)
        self._state: Mapping[str, np.ndarray] = {}
        self.clipped = 0

    def configure_round(self, round: int, state: Mapping[str, np.ndarray]) -> dict[str, Any]:
        self._state = state  # the global model this round starts from
        return {}  # nothing the workers need to know

    def aggregate(
        self, round: int, contributions: Sequence[Contribution]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        names = [n for n, v in self._state.items() if np.issubdtype(v.dtype, np.floating)]
        total = {n: np.zeros(self._state[n].shape, dtype=np.float64) for n in names}
        norms = []
        for c in contributions:
            norm = math.sqrt(sum(float(np.square(c.update[n], dtype=np.float64).sum()) for n in names))
            scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
            self.clipped += scale < 1.0
            norms.append(norm)
            for n in names:
                total[n] += scale * c.update[n]
        new = {n: (self._state[n] + total[n] / len(contributions)).astype(self._state[n].dtype) for n in names}
        return new, {"max_update_norm": max(norms), "clipped_total": float(self.clipped)}

    def state_dict(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "clipped": self.clipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("max_norm") != self.max_norm:
            raise ConfigError(f"checkpoint max_norm {state.get('max_norm')} differs from this job's {self.max_norm}")
        self.clipped = int(state["clipped"])


def job_file(out: Path, *, rounds: int, port: int, max_norm: float) -> dict[str, Any]:
    workers = [
        {"name": f"worker-{i}", "role": "worker",
         "data": {"kind": "sklearn", "name": "breast_cancer", "partition": {"num_parts": 3, "index": i}}}
        for i in range(3)
    ]  # fmt: skip
    return {
        "job": {"name": "api-custom-strategy", "mode": "hfl", "seed": 0},
        "parties": [{"name": "server", "role": "server", "address": f"127.0.0.1:{port}"}, *workers],
        "tee": {"attester": "simulated", "allow_simulated_insecure": True},  # INSECURE: no TEE
        "policy": str(HERE / "policy-sim.json"),
        "code": ["api_custom_strategy"],  # this module: imported by the server and measured with the job
        "model": {"name": "mlp", "args": {"in_features": 30, "hidden": [16], "out_features": 1}},
        "strategy": {
            "name": "api_custom_strategy:NormClippedMean",
            "params": {"max_norm": max_norm},
            "rounds": rounds,
            "local_epochs": 2,
            "batch_size": 32,
            "lr": 0.05,
            "round_timeout_s": 120,
        },
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
    parser.add_argument("--max-norm", type=float, default=0.1)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The parties are processes of their own: they find this module on PYTHONPATH.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    job = out / "job.yaml"
    spec = job_file(out, rounds=args.rounds, port=free_port(), max_norm=args.max_norm)
    job.write_text(json.dumps(spec, indent=2))  # JSON is YAML

    from enclavefl.jobs.launcher import run_job

    result = run_job(job, out_dir=out)
    print(json.dumps(result.summary, indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
