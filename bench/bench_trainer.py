"""The built-in worker as a TorchTrainer vs the worker loop it replaced: round time, side by side.

One worker's round, everything but the network (identical in both: the same wire layout
and messages), for the same model, data, batches and seed:

* old: the pre-TorchTrainer worker's code, copied here as it was (git 238db1f,
  src/enclavefl/hfl/worker.py `_apply_state`, `_train_round`, `update_contribution`):
  load the served state into the model, snapshot it, local SGD over `batch_indices`,
  deltas, pack the contribution.
* new: today's worker with a TorchTrainer (the old loop's torch.optim.SGD, the same
  batches): the served state as numpy weights, `trainer.fit` (load, `train_one_round`,
  read back), the contribution, packed.
* builtin (information): the same with today's `builtin_trainer`, whose rounds use
  `PlainSGD` (torch.optim.SGD's update without torch._dynamo's import; see train/optim.py).

Rounds alternate old/new so load on this shared machine hits both alike. Time is the
round's CPU time (one torch thread: the thread's CPU time is the round's work, which other
processes on these shared cores cannot inflate); wall times are reported beside it. The
headline is the median over rounds of new/old per-round CPU time (target <= 1.02). Two models: the MLP of
examples/hfl_default_credit.yaml (8,000 rows x 23 features, batch 64, 2 local epochs;
the worst case: little compute per parameter) and ResNet-20 on CIFAR-shaped random data.
One torch thread. Prints one JSON object.

    python bench/bench_trainer.py [--rounds 7] [--cifar-rows 512] [--models mlp,resnet20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from enclavefl.data.tensors import batch_indices
from enclavefl.hfl import wire
from enclavefl.hfl.state import model_state
from enclavefl.hfl.strategies import update_contribution
from enclavefl.hfl.worker import Worker, builtin_trainer
from enclavefl.train.torch import TensorBatches, TorchTrainer, sgd_factory
from enclavefl.models import mlp, resnet_v2
from enclavefl.train.losses import default_loss


class _Client:
    """Enough of an AttestedClient for a worker that never calls out."""

    party = "bench"
    target = "nowhere"


class OldLoop:
    """The worker's round before TorchTrainer (git 238db1f), without the network calls."""

    def __init__(self, model: nn.Module, train: Sequence[torch.Tensor], *, batch_size: int, lr: float,
                 momentum: float, local_epochs: int, seed: int) -> None:  # fmt: skip
        self.model, self.train = model, tuple(train)
        self.layout = wire.Layout(model)
        self.batch_size, self.lr, self.momentum, self.local_epochs, self.seed = (
            batch_size, lr, momentum, local_epochs, seed)  # fmt: skip

    def round(self, dense: torch.Tensor, ints: torch.Tensor, version: int) -> dict[str, torch.Tensor]:
        self.layout.check_state_tensors(dense, ints)  # _apply_state
        self.layout.load_state(self.model, dense, ints)
        start = model_state(self.model)  # _run_rounds
        model = self.model  # _train_round
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=0.0)
        model.train()
        rows = len(self.train[-1])
        for epoch in range(self.local_epochs):
            seed = self.seed + version * self.local_epochs + epoch
            for index in batch_indices(rows, self.batch_size, shuffle=True, seed=seed):
                batch = [t[torch.from_numpy(index)] for t in self.train]
                optimizer.zero_grad(set_to_none=True)
                loss = default_loss(model(*batch[:-1]), batch[-1])
                loss.backward()
                optimizer.step()
        contribution = update_contribution(model, start, worker="bench", num_examples=rows, version=version)
        return self.layout.pack_contribution(contribution)


class NewRound:
    """Today's worker round: numpy weights, trainer.fit, the contribution."""

    def __init__(self, model: nn.Module, train: Sequence[torch.Tensor], *, builtin: bool, **settings: Any) -> None:
        if builtin:
            self.trainer = builtin_trainer(model, train, **settings)
        else:
            self.trainer = TorchTrainer(
                model, default_loss, sgd_factory(settings["lr"], settings["momentum"]),
                TensorBatches(train, settings["batch_size"], seed=settings["seed"]),
                local_epochs=settings["local_epochs"],
            )  # fmt: skip
        self.worker = Worker(_Client(), self.trainer)  # type: ignore[arg-type]
        self.layout = wire.Layout(model)
        self.worker._layout = self.layout

    def round(self, dense: torch.Tensor, ints: torch.Tensor, version: int) -> dict[str, torch.Tensor]:
        self.layout.check_state_tensors(dense, ints)  # _apply_state
        self.worker._dense, self.worker._ints = dense.numpy(), ints.numpy()
        weights = self.worker.weights()  # _run_rounds
        result = self.trainer.fit(weights, {"round": version + 1, "strategy": "fedavg"})
        contribution = self.worker._update_contribution(weights, result, version)
        return self.layout.pack_contribution(contribution)


def compare(name: str, make_model: Callable[[], nn.Module], train: Sequence[torch.Tensor], *, rounds: int,
            **settings: Any) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(0)
    initial = make_model()
    layout = wire.Layout(initial)
    dense, ints = layout.pack_state(initial)
    sides: dict[str, Any] = {
        "old": OldLoop(make_model(), train, **settings),
        "new": NewRound(make_model(), train, builtin=False, **settings),
        "builtin": NewRound(make_model(), train, builtin=True, **settings),
    }
    times: dict[str, list[float]] = {label: [] for label in sides}
    walls: dict[str, list[float]] = {label: [] for label in sides}
    payloads: dict[str, torch.Tensor] = {}
    for version in range(rounds + 1):  # round 0 warms up both
        order = list(sides.items())
        for label, side in order if version % 2 == 0 else order[::-1]:
            started, cpu = time.perf_counter(), time.thread_time()
            packed = side.round(dense.clone(), ints.clone(), version)
            elapsed, wall = time.thread_time() - cpu, time.perf_counter() - started
            if version:
                times[label].append(elapsed)
                walls[label].append(wall)
            payloads[label] = packed[wire.PAYLOAD]
    ratios = [n / o for n, o in zip(times["new"], times["old"], strict=False)]
    builtin = [n / o for n, o in zip(times["builtin"], times["old"], strict=False)]
    # Same training: the old payload holds deltas, the new one values (start + delta).
    same = torch.allclose(payloads["new"] - dense[: layout.num_updates], payloads["old"], atol=1e-6) and torch.allclose(
        payloads["builtin"] - dense[: layout.num_updates], payloads["old"], atol=1e-5)
    return {
        "model": name,
        "parameters": sum(p.numel() for p in initial.parameters()),
        "old_round_cpu_s": {"median": statistics.median(times["old"]), "min": min(times["old"])},
        "new_round_cpu_s": {"median": statistics.median(times["new"]), "min": min(times["new"])},
        "builtin_round_cpu_s": {"median": statistics.median(times["builtin"]), "min": min(times["builtin"])},
        "round_ratio_new_over_old": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "round_ratio_builtin_over_old": {"median": statistics.median(builtin), "min": min(builtin)},
        "wall_s": {side: {"median": statistics.median(v), "min": min(v)} for side, v in walls.items()},
        "same_training": bool(same),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cifar-rows", type=int, default=512)
    parser.add_argument("--models", default="mlp,resnet20", help="comma-separated: mlp, resnet20")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    credit = (torch.randn(8000, 23, generator=generator), torch.randint(0, 2, (8000,), generator=generator).float())
    cifar = (torch.randn(args.cifar_rows, 3, 32, 32, generator=generator),
             torch.randint(0, 10, (args.cifar_rows,), generator=generator))  # fmt: skip
    chosen = set(args.models.split(","))
    results = []
    if "mlp" in chosen:
        results.append(compare("mlp-23-64-32-1", lambda: mlp(23, (64, 32), 1), credit, rounds=args.rounds,
                               batch_size=64, lr=0.05, momentum=0.9, local_epochs=2, seed=0))  # fmt: skip
    if "resnet20" in chosen:
        results.append(compare("resnet20", lambda: resnet_v2(20), cifar, rounds=max(3, args.rounds // 2),
                               batch_size=64, lr=0.05, momentum=0.9, local_epochs=1, seed=0))  # fmt: skip
    worst = max(r["round_ratio_new_over_old"]["median"] for r in results)
    print(json.dumps({
        "headline": [{"name": "TorchTrainer worker round / old worker loop (median, worst model)",
                      "value": worst, "op": "<=", "target": 1.02}],
        "results": results,
        "torch_threads": 1,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
