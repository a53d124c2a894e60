"""Utility and leakage against epsilon: AUC of default_credit HFL (record-level DP-SGD) and
VFL (label DP by randomized response) for epsilon in 1, 2, 4, 8 and inf (HFL also at 3), and the advantage of
a loss-threshold membership-inference attack for epsilon in 1, 8 and inf.

* HFL: the hfl_default_credit_dp.yaml federation run in one process (three workers with
  their own rows, DpSgd per worker, FedAvg of their deltas weighted by rows, the same model,
  rounds, batch size and learning rate), evaluated on the 6,000-row test file. epsilon inf
  is the same loop without DP (plain local SGD with the same batches).
* VFL: the vfl_default_credit_label_dp.yaml split model (a bottom MLP per party, the top
  MLP over their outputs) trained in one process on the aligned rows, exactly what the
  bridge computes, with the leader's training labels through randomized response; AUC on
  the same held-out 20 % of rows, with true labels.
* Membership inference (Yeom et al. 2018): an MLP is trained on 1,000 member rows with
  DP-SGD at each epsilon, the same settings for all but a smaller learning rate under
  DP-SGD's noise (small data, many epochs, so that the non-private model overfits); the
  attack guesses "member" when a row's loss is below a threshold; the
  advantage is max over thresholds of TPR - FPR on the members against 1,000 held-out
  rows, which DP bounds by (e^eps - 1 + 2 delta) / (e^eps + 1).

Prints one JSON object.   python bench/bench_dp_utility.py [--seeds 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from enclavefl.data import load_fate_csv
from enclavefl.data.tensors import batch_indices
from enclavefl.models.registry import build_model
from enclavefl.privacy.dpsgd import DpSgd
from enclavefl.privacy.label import randomized_response
from enclavefl.train.losses import default_loss

SHARED = Path(os.environ.get("ENCLAVEFL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TABULAR = SHARED / "tabular"
EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)
HFL_EPSILONS = (1.0, 2.0, 3.0, 4.0, 8.0, math.inf)  # 3: the example's budget
MIA_EPSILONS = (1.0, 8.0, math.inf)
DELTA = 1e-5


def _tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    table = load_fate_csv(path)
    return torch.from_numpy(table.X.astype("float32")), torch.from_numpy(table.y.astype("float32"))


def _sgd(model: nn.Module, lr: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def _plain_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    seed: int,
) -> None:
    optimizer = _sgd(model, lr, momentum)
    model.train()
    for epoch in range(epochs):
        for index in batch_indices(len(y), batch_size, shuffle=True, seed=seed + epoch):
            rows = torch.from_numpy(index)
            optimizer.zero_grad(set_to_none=True)
            default_loss(model(x[rows]), y[rows]).backward()
            optimizer.step()


def _auc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        scores = model(x).reshape(-1).numpy()
    model.train()
    return float(roc_auc_score(y.numpy(), scores))


def hfl_auc(
    epsilon: float, *, rounds: int, local_epochs: int, batch_size: int, lr: float, momentum: float, seed: int
) -> dict[str, Any]:
    workers = [_tensors(TABULAR / f"default_credit_homo_{n}.csv") for n in ("guest", "host_1", "host_2")]
    test_x, test_y = _tensors(TABULAR / "default_credit_homo_test.csv")
    torch.manual_seed(seed)
    global_model = build_model("mlp", in_features=23, hidden=[64, 32], out_features=1)
    models, privacy = [], []
    for i, (x, y) in enumerate(workers):
        model = build_model("mlp", in_features=23, hidden=[64, 32], out_features=1)
        models.append(model)
        if math.isfinite(epsilon):
            steps = rounds * local_epochs * -(-len(y) // batch_size)
            privacy.append(
                DpSgd(
                    model,
                    (x, y),
                    batch_size=batch_size,
                    delta=DELTA,
                    planned_steps=steps,
                    max_grad_norm=1.0,
                    target_epsilon=epsilon,
                    seed=seed * 10 + i,
                )
            )
    for r in range(rounds):
        states, weights = [], []
        for i, (model, (x, y)) in enumerate(zip(models, workers, strict=True)):
            model.load_state_dict(global_model.state_dict())
            if privacy:
                privacy[i].train(_sgd(model, lr, momentum), epochs=local_epochs, loss_fn=default_loss)
            else:
                _plain_epochs(
                    model,
                    x,
                    y,
                    epochs=local_epochs,
                    batch_size=batch_size,
                    lr=lr,
                    momentum=momentum,
                    seed=seed + r * local_epochs,
                )
            states.append(model.state_dict())
            weights.append(len(y))
        total = sum(weights)
        global_model.load_state_dict(
            {k: sum(s[k] * w for s, w in zip(states, weights, strict=True)) / total for k in states[0]}
        )
    return {
        "auc": _auc(global_model, test_x, test_y),
        "spent_epsilon": max(p.epsilon for p in privacy) if privacy else math.inf,
    }


class _Split(nn.Module):
    """The vfl job's split model in one process: bottom(leader cols), bottom(follower cols) -> top."""

    def __init__(self, leader_features: int, follower_features: int) -> None:
        super().__init__()
        self.leader = build_model("bottom_mlp", in_features=leader_features, hidden=[32], out_features=16)
        self.follower = build_model("bottom_mlp", in_features=follower_features, hidden=[32], out_features=16)
        self.top = build_model("top_mlp", in_features=32, hidden=[32], out_features=1)
        self.leader_features = leader_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.leader_features
        return self.top([self.leader(x[:, :split]), self.follower(x[:, split:])])


def vfl_auc(epsilon: float, *, epochs: int, batch_size: int, lr: float, momentum: float, seed: int) -> dict[str, Any]:
    guest = load_fate_csv(TABULAR / "default_credit_hetero_guest.csv")
    host = load_fate_csv(TABULAR / "default_credit_hetero_host.csv")
    position = {v: i for i, v in enumerate(host.ids)}
    common = [i for i, v in enumerate(guest.ids) if v in position]
    x = np.concatenate([guest.X[common], host.X[[position[guest.ids[i]] for i in common]]], axis=1).astype("float32")
    y = guest.y[common].astype("float32")
    order = np.random.default_rng(seed).permutation(len(y))
    held = int(round(0.2 * len(y)))
    val, train = order[:held], order[held:]
    train_y = y[train]
    if math.isfinite(epsilon):
        train_y = randomized_response(train_y, epsilon, num_classes=2, rng=np.random.default_rng(seed + 1))
    torch.manual_seed(seed)
    model = _Split(guest.X.shape[1], host.X.shape[1])
    _plain_epochs(
        model,
        torch.from_numpy(x[train]),
        torch.from_numpy(train_y),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        seed=seed,
    )
    flipped = float(np.mean(train_y != y[train]))
    return {"auc": _auc(model, torch.from_numpy(x[val]), torch.from_numpy(y[val])), "labels_flipped": flipped}


def membership_advantage(
    epsilon: float, *, seed: int, epochs: int, hidden: int, batch: int, lr: float, momentum: float, dp_lr: float
) -> dict[str, Any]:
    x, y = _tensors(TABULAR / "default_credit_homo_guest.csv")
    order = np.random.default_rng(seed).permutation(len(y))
    members, others = torch.from_numpy(order[:1000]), torch.from_numpy(order[1000:2000])
    torch.manual_seed(seed)
    model = build_model("mlp", in_features=23, hidden=[hidden, hidden], out_features=1)
    mx, my = x[members], y[members]
    if math.isfinite(epsilon):
        steps = epochs * (len(my) // batch)
        dp = DpSgd(
            model,
            (mx, my),
            batch_size=batch,
            delta=DELTA,
            planned_steps=steps,
            max_grad_norm=1.0,
            target_epsilon=epsilon,
            seed=seed,
        )
        dp.train(_sgd(model, dp_lr, momentum), epochs=epochs, loss_fn=default_loss)
    else:
        _plain_epochs(model, mx, my, epochs=epochs, batch_size=batch, lr=lr, momentum=momentum, seed=seed)
    model.eval()
    with torch.no_grad():
        loss_in = nn.functional.binary_cross_entropy_with_logits(model(mx).reshape(-1), my, reduction="none").numpy()
        loss_out = nn.functional.binary_cross_entropy_with_logits(
            model(x[others]).reshape(-1), y[others], reduction="none"
        ).numpy()
    thresholds = np.unique(np.concatenate([loss_in, loss_out]))
    tpr = np.searchsorted(np.sort(loss_in), thresholds, side="right") / len(loss_in)
    fpr = np.searchsorted(np.sort(loss_out), thresholds, side="right") / len(loss_out)
    bound = 1.0 if math.isinf(epsilon) else (math.exp(epsilon) - 1 + 2 * DELTA) / (math.exp(epsilon) + 1)
    return {
        "advantage": float(np.max(tpr - fpr)),
        "dp_bound": bound,
        "train_loss": float(loss_in.mean()),
        "heldout_loss": float(loss_out.mean()),
    }


def _key(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer rounds/epochs (a smoke run, not the figures)")
    parser.add_argument("--only", choices=["hfl", "vfl", "mia"], action="append")
    parser.add_argument("--hfl", default="10,2,256,0.2,0.9", help="rounds,local_epochs,batch_size,lr,momentum")
    parser.add_argument(
        "--mia",
        default="100,256,50,0.1,0.9,0.01",
        help="epochs,hidden,batch_size,lr,momentum,dp_lr (DP-SGD's noise needs a smaller step)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)
    parts = args.only or ["hfl", "vfl", "mia"]
    rounds, local_epochs, batch_size, lr, momentum = (float(v) for v in args.hfl.split(","))
    hfl_settings = {
        "rounds": 2 if args.quick else int(rounds),
        "local_epochs": int(local_epochs),
        "batch_size": int(batch_size),
        "lr": lr,
        "momentum": momentum,
    }
    vfl_settings = {"epochs": 2 if args.quick else 10, "batch_size": 256, "lr": 0.05, "momentum": 0.9}
    out: dict[str, Any] = {"delta": DELTA, "seeds": args.seeds, "accountant": "rdp"}
    started = time.perf_counter()
    if "hfl" in parts:
        out["hfl_record_dp"] = {
            "settings": hfl_settings,
            "auc_by_epsilon": {
                _key(e): [hfl_auc(e, seed=s, **hfl_settings) for s in range(args.seeds)] for e in HFL_EPSILONS
            },
        }
    if "vfl" in parts:
        out["vfl_label_dp"] = {
            "settings": vfl_settings,
            "auc_by_epsilon": {
                _key(e): [vfl_auc(e, seed=s, **vfl_settings) for s in range(args.seeds)] for e in EPSILONS
            },
        }
    if "mia" in parts:
        epochs, hidden, batch, mia_lr, mia_momentum, dp_lr = (float(v) for v in args.mia.split(","))
        mia_settings = {
            "epochs": 3 if args.quick else int(epochs),
            "hidden": int(hidden),
            "batch": int(batch),
            "lr": mia_lr,
            "momentum": mia_momentum,
            "dp_lr": dp_lr,
        }
        out["membership_inference"] = {
            "members": 1000,
            "heldout": 1000,
            "settings": mia_settings,
            "by_epsilon": {
                _key(e): [membership_advantage(e, seed=s, **mia_settings) for s in range(args.seeds)]
                for e in MIA_EPSILONS
            },
        }
    out["wall_s"] = time.perf_counter() - started
    headline = []
    if "hfl" in parts:
        headline.append(
            {
                "name": "HFL record DP AUC at epsilon 3",
                "op": ">=",
                "target": 0.74,
                "value": float(np.mean([r["auc"] for r in out["hfl_record_dp"]["auc_by_epsilon"]["3"]])),
            }
        )
    if "vfl" in parts:
        headline.append(
            {
                "name": "VFL label DP AUC at epsilon 2",
                "op": ">=",
                "target": 0.74,
                "value": float(np.mean([r["auc"] for r in out["vfl_label_dp"]["auc_by_epsilon"]["2"]])),
            }
        )
    out["headline"] = headline
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
