"""`TorchTrainer`: a PyTorch model, loss, optimizer and data as an enclavefl trainer.

The trainer keeps the user's `nn.Module` on its device and exchanges weights with
enclavefl as numpy arrays (name -> array, the names of `named_parameters()` and the
persistent buffers); tensors leave the device only at that boundary. Every round:
`fit` loads the weights it is given, runs `train_one_round(config)` and returns the new
weights. Override `train_one_round` to bring any loop of your own (optimizer, scheduler,
gradient clipping, AMP, custom batches): enclavefl only needs the model trained in place.

For `sync-sgd`/`async-sgd`, `gradients` returns the gradients of one batch (the next of
`train_loader`, cycled); sparse embedding gradients come back as `Rows`, so only the
rows a batch touched travel.

A batch is whatever the loader yields; `split_batch` turns it into (model inputs,
labels): by default the last element of a tuple/list is the labels, the rest are the
model's positional inputs (a `TensorDataset`'s batches). The model returns logits.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from enclavefl.errors import FormatError, UsageError
from enclavefl.train.contract import Config, EvalResult, FitResult, GradResult, Rows, Weights
from enclavefl.train.device import resolve_device
from enclavefl.train.losses import default_loss
from enclavefl.train.metrics import AUC_BINS, MetricFn, eval_stats
from enclavefl.train.tasks import TaskType
from enclavefl.validate import is_int, is_number

__all__ = [
    "LossFn",
    "OptimizerFactory",
    "RowsOf",
    "TensorBatches",
    "TorchTrainer",
    "embedding_rows",
    "load_saved",
    "proximal_term",
    "sgd_factory",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
RowsOf = Callable[[Sequence[torch.Tensor]], Mapping[str, torch.Tensor]]


def sgd_factory(lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0) -> OptimizerFactory:
    """torch.optim.SGD over the model's trainable parameters (the built-in worker's optimizer)."""
    if not lr > 0 or not 0 <= momentum < 1 or not weight_decay >= 0:
        raise UsageError(
            f"local SGD needs lr > 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}"
        )

    def make(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    return make


def proximal_term(model: nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu / 2) * sum ||w - w_anchor||^2 over the trainable parameters, to add to the loss.

    Its gradient mu (w - w_anchor) is dense, embedding tables included.
    """
    if not is_number(mu) or not mu >= 0:
        raise UsageError(f"mu must be >= 0, got {mu!r}")
    missing = [name for name, p in model.named_parameters() if p.requires_grad and name not in anchor]
    if missing:
        raise UsageError(f"the anchor state has no {missing[0]!r}")
    terms = [(p - anchor[name].detach()).pow(2).sum() for name, p in model.named_parameters() if p.requires_grad]
    if not terms:
        raise UsageError("the model has no trainable parameters")
    return (mu / 2) * torch.stack(terms).sum()


class TensorBatches:
    """Batches of (inputs..., labels) tensors, reshuffled each pass with seed + pass number.

    Deterministic across processes (a numpy generator per pass), so every worker of a job
    and a local re-run see the same batch order.
    """

    def __init__(self, tensors: Sequence[Any], batch_size: int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.tensors = as_tensors("training data", tensors)
        if not is_int(batch_size) or batch_size < 1:
            raise UsageError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self._passes = 0

    def __len__(self) -> int:
        return (self.rows + self.batch_size - 1) // self.batch_size

    @property
    def rows(self) -> int:
        return int(self.tensors[-1].shape[0])

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        seed, self._passes = self.seed + self._passes, self._passes + 1
        order = np.random.default_rng(seed).permutation(self.rows) if self.shuffle else np.arange(self.rows)
        for start in range(0, self.rows, self.batch_size):
            picked = torch.from_numpy(order[start : start + self.batch_size])
            yield [t[picked] for t in self.tensors]


def as_tensors(what: str, data: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """Model inputs then labels, as tensors with the same number of rows (at least one)."""
    tensors = tuple(torch.as_tensor(t) for t in data)
    if len(tensors) < 2:
        raise UsageError(f"{what} must hold the model inputs and then the labels, got {len(tensors)} tensor(s)")
    rows = {int(t.shape[0]) for t in tensors}
    if len(rows) != 1 or 0 in rows:
        raise UsageError(f"{what}: tensors must have the same number of rows (>= 1), got {sorted(rows)}")
    return tensors


def embedding_rows(model: nn.Module) -> RowsOf | None:
    """Finds the embedding-table rows a batch reads by running the model on it (eval mode, no grad).

    None when the model has no trainable nn.Embedding/EmbeddingBag. Costs one forward
    pass per batch; give `rows_of` to TorchTrainer to name the rows directly instead.
    """
    modules = {
        f"{prefix}.weight" if prefix else "weight": module
        for prefix, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.weight.requires_grad
    }
    if not modules:
        return None

    def rows_of(inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        seen: dict[str, list[torch.Tensor]] = {}

        def recorder(name: str) -> Callable[..., None]:
            def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
                seen.setdefault(name, []).append(args[0].detach().reshape(-1).to(torch.int64))

            return record

        handles = [m.register_forward_pre_hook(recorder(name)) for name, m in modules.items()]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(*inputs)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        return {name: torch.cat(parts) for name, parts in seen.items()}

    return rows_of


class TorchTrainer:
    """A torch model trained by `optimizer_factory` on `train_loader`, evaluated on `eval_loader`.

    `loss(logits, labels)` is a mean over the batch (default: BCE-with-logits for one
    logit, cross-entropy for several). `optimizer_factory(model)` is called at the start
    of every round, so each round starts with a fresh optimizer (momentum, Adam moments);
    keep state across rounds by overriding `train_one_round`. `local_epochs` is the
    number of passes per round unless the round's config names `local_epochs`. A config
    `mu` > 0 (FedProx) adds the proximal term around the weights the round started from.
    `device`: auto | cpu | cuda | cuda:N (see `resolve_device`). `rows_of(inputs)` names
    the embedding rows a batch reads (default: found by a forward pass). `task` (binary,
    multiclass, regression; None: by the output width) shapes the evaluation statistics,
    and `metrics` (name -> fn(outputs, labels) -> float) adds the user's own to them.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        train_loader: Iterable[Any] | None = None,
        eval_loader: Iterable[Any] | None = None,
        *,
        device: str | torch.device = "cpu",
        local_epochs: int = 1,
        rows_of: RowsOf | None = None,
        auc_bins: int | None = AUC_BINS,
        task: TaskType | None = None,
        metrics: Mapping[str, MetricFn] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"TorchTrainer needs a torch.nn.Module, got {type(model).__name__}")
        if not is_int(local_epochs) or local_epochs < 1:
            raise UsageError(f"local_epochs must be an int >= 1, got {local_epochs!r}")
        self.device = resolve_device(device)
        self._cpu = self.device.type == "cpu"
        self.model = model.to(self.device)
        self.loss = loss or default_loss
        self.optimizer_factory = optimizer_factory or sgd_factory()
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.local_epochs = local_epochs
        self.auc_bins = auc_bins
        self.task = task
        self.metrics = dict(metrics or {})
        self._rows_of = rows_of or embedding_rows(model)
        self._stream: Iterator[Any] | None = None
        self._lookahead: list[Any] = []
        persistent = set(model.state_dict(keep_vars=True))
        self._buffers = [name for name, _ in model.named_buffers() if name in persistent]
        self._trainable = [name for name, p in model.named_parameters() if p.requires_grad]

    # -- the contract -------------------------------------------------------------------

    def fit(self, weights: Weights, config: Config) -> FitResult:
        """Load `weights`, train one round in place, return the new weights and metrics."""
        self.set_weights(weights)
        metrics = dict(self.train_one_round(config) or {})
        examples = metrics.pop("num_examples", None)
        if examples is None:
            examples = self.num_examples()
        return FitResult(self.get_weights(), int(examples), metrics)

    def evaluate(self, weights: Weights, config: Config) -> EvalResult:
        """Load `weights`, evaluate on `eval_loader` (eval mode, no grad)."""
        if self.eval_loader is None:
            raise UsageError("this TorchTrainer has no eval_loader")
        self.set_weights(weights)
        model = self.model
        logits_parts, label_parts = [], []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in self.eval_loader:
                    inputs, labels = self._on_device(batch)
                    logits_parts.append(model(*inputs).detach())
                    label_parts.append(labels.detach())
        finally:
            model.train(was_training)
        if not label_parts:
            raise UsageError("the eval_loader yielded no batch")
        logits, labels = torch.cat(logits_parts), torch.cat(label_parts)
        loss = float(self.loss(logits, labels))
        stats = eval_stats(
            logits.cpu(), labels.cpu(), task=self.task, auc_bins=self.auc_bins, user_metrics=self.metrics
        )
        metrics = {k: v for k, v in stats.summary().items() if k != "examples"}
        tensors = {k: v.cpu().numpy() for k, v in stats.to_tensors().items()}
        return EvalResult(loss, int(labels.shape[0]), metrics, tensors)

    def gradients(self, weights: Weights, config: Config) -> GradResult:
        """Load `weights`, the gradients of the mean loss on the next training batch."""
        self.set_weights(weights)
        model = self.model
        model.train()
        model.zero_grad(set_to_none=True)
        inputs, labels = self._on_device(self._next_batch())
        loss = self.loss(model(*inputs), labels)
        loss.backward()
        grads: dict[str, np.ndarray | Rows] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad or p.grad is None:
                continue
            grad = p.grad.detach()
            if grad.is_sparse:
                grad = grad.coalesce()
                grads[name] = Rows(grad.indices()[0].cpu().numpy(), grad.values().cpu().numpy())
            else:
                grads[name] = grad.cpu().numpy().copy()
        model.zero_grad(set_to_none=True)
        live = dict(model.named_buffers())
        buffers = {name: live[name].detach().cpu().numpy().copy() for name in self._buffers}
        return GradResult(grads, int(labels.shape[0]), {"loss": float(loss.detach())}, buffers)

    # -- what users override ------------------------------------------------------------

    def train_one_round(self, config: Config) -> Mapping[str, float]:
        """One round of local training, in place on `self.model`; returns metrics.

        The default: `local_epochs` passes over `train_loader` with a fresh optimizer,
        mean loss per batch, plus FedProx's proximal term when `config["mu"]` > 0. A
        metric `num_examples` overrides `num_examples()` for this round.
        """
        model = self.model
        optimizer = self.optimizer_factory(model)
        mu = float(config.get("mu", 0.0) or 0.0)
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if mu > 0 else None
        epochs = int(config.get("local_epochs", self.local_epochs))
        model.train()
        total, batches = 0.0, 0
        for _ in range(epochs):
            for batch in self._train_loader():
                inputs, labels = self._on_device(batch)
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss(model(*inputs), labels)
                if anchor is not None:
                    loss = loss + proximal_term(model, anchor, mu)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
        return {"loss": total / max(batches, 1)}

    def split_batch(self, batch: Any) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
        """(model inputs, labels) of one batch: the last element is the labels."""
        if type(batch) in (tuple, list) and len(batch) >= 2:  # the common case, checked cheaply per batch
            return batch[:-1], batch[-1]
        if isinstance(batch, Mapping) or not isinstance(batch, Sequence) or len(batch) < 2:
            raise UsageError(
                f"a batch must be a tuple/list (inputs..., labels), got {type(batch).__name__}; "
                "override TorchTrainer.split_batch for other batch types"
            )
        return tuple(batch[:-1]), batch[-1]

    def num_examples(self) -> int:
        """Training examples per round (the averaging weight): the loader's dataset size."""
        loader = self._train_loader()
        rows = getattr(loader, "rows", None)
        if rows is None:
            dataset = getattr(loader, "dataset", None)
            rows = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
        if rows is None:
            raise UsageError(
                "cannot tell the number of training examples: give a loader with a sized dataset, "
                "return a num_examples metric from train_one_round, or override num_examples()"
            )
        return int(rows)

    # -- weights at the numpy boundary --------------------------------------------------

    def get_weights(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and persistent buffer, as numpy (on the host)."""
        return {name: t.detach().cpu().numpy().copy() for name, t in self._live().items()}

    def set_weights(self, weights: Weights) -> None:
        """Copy `weights` into the model in place (optimizers keep their references).

        Names must be the model's; a name not given keeps its value.
        """
        live = self._live()
        unknown = sorted(set(weights) - set(live))
        if unknown:
            raise UsageError(f"weights for names the model does not have: {unknown[:5]}")
        with torch.no_grad():
            for name, value in weights.items():
                target = live[name]
                array = np.asarray(value)
                if tuple(array.shape) != tuple(target.shape):
                    raise UsageError(f"weights {name!r}: shape {list(array.shape)}, the model has {list(target.shape)}")
                if target.device.type == "cpu" and array.ctypes.data == target.data_ptr() and array.size:
                    continue  # already the model's own memory
                target.copy_(torch.from_numpy(array) if array.flags.writeable else torch.tensor(array))

    def table_rows(self, which: str) -> dict[str, np.ndarray]:
        """Embedding rows read by the next training batch ("next"), all of them ("train"), or evaluation ("eval")."""
        if self._rows_of is None:
            return {}
        if which == "next":
            batches: Iterable[Any] = [self._peek()]
        elif which == "train":
            batches = self._train_loader()
        elif which == "eval":
            if self.eval_loader is None:
                return {}
            batches = self.eval_loader
        else:
            raise UsageError(f"table_rows: which must be next, train or eval, got {which!r}")
        found: dict[str, list[torch.Tensor]] = {}
        for batch in batches:
            inputs, _ = self._on_device(batch)
            for name, index in self._rows_of(inputs).items():
                found.setdefault(name, []).append(torch.unique(index.reshape(-1)))
        return {name: torch.unique(torch.cat(parts)).cpu().numpy() for name, parts in found.items()}

    # -- helpers ------------------------------------------------------------------------

    def _live(self) -> dict[str, torch.Tensor]:
        live: dict[str, torch.Tensor] = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        live.update((name, buffers[name]) for name in self._buffers)
        return live

    def _train_loader(self) -> Iterable[Any]:
        if self.train_loader is None:
            raise UsageError("this TorchTrainer has no train_loader")
        return self.train_loader

    def _on_device(self, batch: Any) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
        inputs, labels = self.split_batch(batch)
        if self._cpu and type(labels) is torch.Tensor and not labels.is_cuda and all(
            type(t) is torch.Tensor and not t.is_cuda for t in inputs
        ):
            return inputs, labels  # a CPU model and a CPU batch: nothing to move (every batch, so cheap)
        return [self._to_device(t) for t in inputs], self._to_device(labels)

    def _to_device(self, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor) and value.device == self.device:
            return value  # nothing to move (the CPU case, every batch)
        return torch.as_tensor(value).to(self.device, non_blocking=True)

    def _next_batch(self) -> Any:
        if self._lookahead:
            return self._lookahead.pop()
        return self._draw()

    def _peek(self) -> Any:
        if not self._lookahead:
            self._lookahead.append(self._draw())
        return self._lookahead[0]

    def _draw(self) -> Any:
        for _ in range(2):
            if self._stream is None:
                self._stream = iter(self._train_loader())
            batch = next(self._stream, _END)
            if batch is not _END:
                return batch
            self._stream = None  # a pass ended: start the next one
        raise UsageError("the train_loader yielded no batch")


_END = object()


def load_saved(data: bytes, *, source: object, what: str) -> dict[str, Any]:
    """The dict `torch.save` wrote into `data` (a checkpoint, a model's state), read with
    `weights_only=True`, so that even an authentic file cannot run code; sparse tensors are
    checked. Anything else is a FormatError naming `source` and `what`."""
    try:
        with torch.sparse.check_sparse_tensor_invariants(enable=True):
            state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        # Authentic (the caller unsealed it with the job's key and binding) yet unreadable:
        # written by an incompatible enclavefl or torch, or something else. torch.load raises
        # whatever its zip and pickle readers raise (UnpicklingError, BadZipFile, KeyError,
        # ...): every one of them means "not a loadable file".
        raise FormatError(f"{source}: authentic but not a loadable {what}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict):
        raise FormatError(f"{source}: {what} must hold a dict, got {type(state).__name__}")
    return state
