"""DP-SGD worker round time vs non-private: the same MLP, data, batch size and steps.

A round is one local epoch over default_credit's guest rows (8,000 x 23) with the
hfl_default_credit_dp.yaml model (MLP 23-64-32-1) and batch size 256: the private side is
the worker's `DpSgd.train` (Opacus per-sample gradients, clipping, noise, Poisson batches),
the plain side the worker's ordinary local SGD loop. Rounds alternate between the two; the
headline is the median of the per-round ratios of process CPU time (wall time alongside),
which other work on a shared machine disturbs less. Prints one JSON object.

    python bench/bench_dp.py [--rounds 7] [--batch-size 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from enclavefl.data import load_fate_csv
from enclavefl.data.tensors import batch_indices
from enclavefl.models.registry import build_model
from enclavefl.privacy.dpsgd import DpSgd
from enclavefl.train.losses import default_loss

SHARED = Path(os.environ.get("ENCLAVEFL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TARGET = 2.0


def plain_round(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    model.train()
    for index in batch_indices(len(y), batch_size, shuffle=True, seed=seed):
        rows = torch.from_numpy(index)
        optimizer.zero_grad(set_to_none=True)
        default_loss(model(x[rows]), y[rows]).backward()
        optimizer.step()


def timed(fn: object) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()  # type: ignore[operator]
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    table = load_fate_csv(SHARED / "tabular" / "default_credit_homo_guest.csv")
    x = torch.from_numpy(table.X.astype("float32"))
    y = torch.from_numpy(table.y.astype("float32"))
    torch.manual_seed(0)
    plain_model = build_model("mlp", in_features=23, hidden=[64, 32], out_features=1)
    private_model = build_model("mlp", in_features=23, hidden=[64, 32], out_features=1)
    private_model.load_state_dict(plain_model.state_dict())
    steps_per_round = -(-len(y) // args.batch_size)
    dp = DpSgd(private_model, (x, y), batch_size=args.batch_size, delta=1e-5,
               planned_steps=steps_per_round * (args.rounds + 1), max_grad_norm=1.0, target_epsilon=3.0)
    # One warm-up round each (allocator, Opacus hooks), then alternate.
    plain_round(plain_model, x, y, args.batch_size, seed=0)
    dp.train(torch.optim.SGD(private_model.parameters(), lr=0.2, momentum=0.9), epochs=1, loss_fn=default_loss)
    plain, private = [], []
    for r in range(args.rounds):
        plain.append(timed(lambda r=r: plain_round(plain_model, x, y, args.batch_size, seed=r + 1)))
        optimizer = torch.optim.SGD(private_model.parameters(), lr=0.2, momentum=0.9)
        private.append(timed(lambda optimizer=optimizer: dp.train(optimizer, epochs=1, loss_fn=default_loss)))
    cpu_ratios = [p[1] / q[1] for p, q in zip(private, plain, strict=True)]
    wall_ratios = [p[0] / q[0] for p, q in zip(private, plain, strict=True)]
    ratio = statistics.median(cpu_ratios)
    print(
        json.dumps(
            {
                "model": "mlp 23-64-32-1",
                "rows": len(y),
                "batch_size": args.batch_size,
                "steps_per_round": steps_per_round,
                "threads": args.threads,
                "plain_round_s": {
                    "wall_median": statistics.median(p[0] for p in plain),
                    "cpu_median": statistics.median(p[1] for p in plain),
                },
                "dp_round_s": {
                    "wall_median": statistics.median(p[0] for p in private),
                    "cpu_median": statistics.median(p[1] for p in private),
                },
                "dp_over_plain_cpu": {"median": ratio, "min": min(cpu_ratios), "max": max(cpu_ratios)},
                "dp_over_plain_wall": {"median": statistics.median(wall_ratios)},
                "dp_epsilon_spent": dp.epsilon,
                "dp_accountant": dp.accountant.name,
                "dp_noise_multiplier": dp.noise_multiplier,
                "headline": [
                    {
                        "name": "DP-SGD / plain worker round (MLP, CPU time)",
                        "value": ratio,
                        "op": "<=",
                        "target": TARGET,
                    }
                ],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
