"""Vertical FL from Python with your own PyTorch models, loss, optimizer and metric.

A clinic (the leader: the target and 4 features of scikit-learn's diabetes data) and a lab
(the follower: the 6 blood serum measurements of the same patients) train a split model
whose every piece is defined below: each party's bottom network, the top network, the
loss, the optimizer factory and a metric of our own. enclavefl brings the rest from the
job file examples/vfl_diabetes_regression.yaml: attestation (simulated here), the
attested channel, private alignment of the patients, the training protocol.

    python examples/api_vfl_torch.py --out runs/api-vfl

Both parties run in this one process for the demo (each in its own thread, each attested
to the other as two hosts would be); on two hosts each runs `lead(...)` or `follow(...)`.
The result is written to DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from enclavefl import follow, lead

HERE = Path(__file__).resolve().parent
JOB = HERE / "vfl_diabetes_regression.yaml"
LEADER_FEATURES, FOLLOWER_FEATURES, WIDTH = 4, 6, 4


class Bottom(nn.Module):
    """A party's network over its own columns; its output is all it ever shares."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class LeaderModel(nn.Module):
    """The clinic's half: its own bottom and the top over [its activations, the lab's]."""

    def __init__(self) -> None:
        super().__init__()
        self.bottom = Bottom(LEADER_FEATURES)
        self.top = nn.Linear(2 * WIDTH, 1)

    def forward(self, x: torch.Tensor, follower_activations: list[torch.Tensor]) -> torch.Tensor:
        return self.top(torch.cat([self.bottom(x), *follower_activations], dim=1))


def squared_error(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs[:, 0], labels.to(outputs.dtype))


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.05)


def median_absolute_error(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((outputs[:, 0].double() - labels.double()).abs().median())


def main(out: Path, job: Path = JOB) -> dict[str, Any]:
    torch.manual_seed(0)
    leader_model, follower_model = LeaderModel(), Bottom(FOLLOWER_FEATURES)
    failures: list[BaseException] = []

    def lab() -> None:
        try:
            follow(job=job, party="lab", model=follower_model, optimizer=adam, out=out)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    thread = threading.Thread(target=lab, name="lab")
    thread.start()
    result = lead(job=job, party="clinic", model=leader_model, optimizer=adam, loss=squared_error,
                  metrics={"median_ae": median_absolute_error}, out=out)
    thread.join()
    if failures:
        raise failures[0]
    summary = {
        "job": "api-vfl-torch",
        "metrics": result["metrics"],
        "split": result["extra"]["split"],
        # Public demo data: the held-out patients, so a centralized baseline can use the same split.
        "validation_ids": [str(i) for i in result["validation_ids"]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where summary.json and the logs go")
    parser.add_argument("--job", type=Path, default=JOB, help="the vertical job file (parties, TEE, data)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(main(args.out.resolve(), args.job), indent=2))
