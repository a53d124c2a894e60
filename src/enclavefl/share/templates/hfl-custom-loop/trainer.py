"""Your own PyTorch training loop, run by every worker in every round: edit it freely.

The job file names it as `trainer: trainer:make_trainer`. Each worker calls
make_trainer(data, model, device=...) once: `data` is its own `data:` section of the job
file (`data.path` is its CSV file), `model` is the job's model (model.py, the same initial
weights on every party). enclavefl then calls the trainer's `fit` every round: it loads the
global weights, runs `train_one_round` below, and sends back only the new weights. Rows
never leave the worker.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from enclavefl import TorchTrainer


def load_rows(path: Path, label: str = "y") -> TensorDataset:
    """A FATE-style CSV (id, label, feature columns) as float tensors (features, labels)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    y_at = header.index(label)
    features = [i for i, column in enumerate(header) if column not in ("id", label)]
    table = np.array(body)
    X = torch.tensor(table[:, features].astype(np.float32))  # noqa: N806
    y = torch.tensor(table[:, y_at].astype(np.float32))
    return TensorDataset(X, y)


log = logging.getLogger(__name__)  # into the worker's log (runs/logs/<worker>.log)

LEARNING_RATE = 0.01
BATCH_SIZE = 32
LOCAL_EPOCHS = 2


class CustomLoop(TorchTrainer):
    """One round = `local_epochs` passes of Adam with a cosine schedule and gradient clipping.

    `config` holds what the strategy sends for this round (its round number, FedProx's mu,
    ...); this loop needs none of it.
    """

    def train_one_round(self, config: Mapping[str, Any]) -> Mapping[str, float]:
        epochs = int(config.get("local_epochs", self.local_epochs))
        optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(self.train_loader))
        self.model.train()
        total, seen = 0.0, 0
        for _ in range(epochs):
            for x, y in self.train_loader:
                x, y = x.to(self.device), y.to(self.device)
                optimizer.zero_grad()
                loss = F.binary_cross_entropy_with_logits(self.model(x).squeeze(1), y)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1.0)
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(y)
                seen += len(y)
        rows = len(self.train_loader.dataset)
        log.info("custom loop: %d epochs of Adam over %d rows, train loss %.4f", epochs, rows, total / max(seen, 1))
        # num_examples weighs this worker's update in FedAvg: its rows, not rows x epochs.
        return {"train_loss": total / max(seen, 1), "num_examples": rows}


def make_trainer(data: Any, model: nn.Module, device: str = "cpu") -> CustomLoop:
    rows = load_rows(Path(data.path), data.label or "y")
    generator = torch.Generator().manual_seed(0)  # the same batch order on every run
    loader = DataLoader(rows, batch_size=BATCH_SIZE, shuffle=True, generator=generator)
    return CustomLoop(model, train_loader=loader, device=device, local_epochs=LOCAL_EPOCHS)
