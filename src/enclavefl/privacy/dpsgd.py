"""Record-level DP-SGD with Opacus (extra `enclavefl[dp]`).

`make_private` wraps a model, its optimizer and its data loader the way Opacus's
`PrivacyEngine.make_private_with_epsilon` does, but over a number of *steps* the whole job
plans (the federation decides how many rounds and local epochs a worker trains), and with
enclavefl's RDP accountant (`enclavefl.privacy.rdp`, equal to Opacus's) stepped by every
optimizer step:

* per-sample gradients (Opacus `GradSampleModule`), each clipped to `max_grad_norm`;
* Gaussian noise of standard deviation `noise_multiplier * max_grad_norm` on their sum,
  divided by the expected batch size (Opacus `DPOptimizer`);
* Poisson sampling: every row joins each batch independently with probability
  `sample_rate = 1 / batches per epoch` (Opacus `DPDataLoader`; `DpSgd` samples its
  tensors the same way without collating rows one by one), which the accounting assumes;
* the noise multiplier found by bisection so that the planned steps spend at most the
  target epsilon at delta.

Models with layers Opacus cannot train privately (BatchNorm mixes the examples of a batch,
so a per-sample gradient does not exist) are refused, naming the layers.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from enclavefl.errors import UsageError
from enclavefl.privacy.rdp import RdpAccountant, Spending, resolve_noise_multiplier
from enclavefl.validate import is_int

try:
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator
except ImportError as exc:  # the optional extra is missing
    raise UsageError(
        "record-level differential privacy (DP-SGD) needs Opacus: pip install 'enclavefl[dp]'"
    ) from exc

__all__ = ["DpSgd", "PrivateTraining", "check_model", "make_private"]

# Opacus's per-sample hooks are full backward hooks on modules whose inputs (data) need no
# gradient; torch warns about it on every step although it is exactly what Opacus expects.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
)


def check_model(model: nn.Module) -> None:
    """Refuse a model with layers Opacus cannot compute per-sample gradients for, naming them."""
    problems = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None:
            for error in validator(module):
                reason = str(error).split(". ")[0]
                problems.append(f"{name or '(model)'} ({type(module).__name__}): {reason}")
    if problems:
        raise UsageError(
            "the model has layers Opacus cannot train with per-sample gradients: "
            + "; ".join(problems)
            + " (replace BatchNorm with GroupNorm or LayerNorm; see opacus.validators.ModuleValidator.fix)"
        )


class _SgdSpending(Spending):
    """DP-SGD's accounting: clipped per-sample gradients, one step per (Poisson) batch."""

    max_grad_norm: float

    def report(self) -> dict[str, Any]:
        """What metrics.jsonl and summary.json record about this worker's privacy."""
        return {
            **super().report(),
            "dp_max_grad_norm": self.max_grad_norm,
            "dp_sample_rate": self.sample_rate,
            "dp_steps": self.accountant.steps,
        }


@dataclass
class PrivateTraining(_SgdSpending):
    """A model, optimizer and loader ready for DP-SGD, and what they spend.

    `model` is the GradSampleModule around the caller's model (which it shares parameters
    with); `accountant.epsilon(delta)` is the epsilon spent by the optimizer steps so far.
    """

    model: GradSampleModule
    optimizer: DPOptimizer
    data_loader: DataLoader
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    planned_steps: int
    accountant: RdpAccountant

    @property
    def steps(self) -> int:
        return self.accountant.steps


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    target_epsilon: float | None,
    delta: float,
    steps: int,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    accountant: RdpAccountant | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[PrivateTraining], None] | None = None,
) -> PrivateTraining:
    """Wrap for DP-SGD over `steps` planned optimizer steps.

    Give `target_epsilon` (the noise multiplier is calibrated to it) or `noise_multiplier`
    (used as is). `accountant` carries steps already spent (a resumed job). `on_step` runs
    after every private step, e.g. to stop at the budget. Sampling and noise use
    `generator`, by default one seeded from the OS's secret randomness.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise UsageError("give exactly one of target_epsilon and noise_multiplier")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise UsageError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
    if not is_int(steps) or steps < 1:
        raise UsageError(f"planned steps must be an int >= 1, got {steps!r}")
    batches = len(data_loader)
    if batches < 1:
        raise UsageError("DP-SGD needs a data loader with at least one batch")
    check_model(model)
    if generator is None:  # not torch's global generator, which user code seeds predictably
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    sample_rate = 1.0 / batches
    noise_multiplier = resolve_noise_multiplier(
        target_epsilon=target_epsilon, noise_multiplier=noise_multiplier, delta=delta, sample_rate=sample_rate,
        steps=steps,
    )
    model.train()
    try:
        private_model = GradSampleModule(model)
    except NotImplementedError as exc:
        raise UsageError(f"Opacus cannot compute per-sample gradients of this model: {exc}") from None
    expected_batch = max(1, round(len(data_loader.dataset) * sample_rate))  # type: ignore[arg-type]
    private_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch,
        generator=generator,
    )
    loader = DPDataLoader.from_data_loader(data_loader, generator=generator)
    training = PrivateTraining(
        model=private_model,
        optimizer=private_optimizer,
        data_loader=loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=sample_rate,
        delta=delta,
        planned_steps=steps,
        accountant=accountant if accountant is not None else RdpAccountant(),
    )

    def account(optim: DPOptimizer) -> None:
        training.accountant.step(noise_multiplier=optim.noise_multiplier, sample_rate=sample_rate)
        if on_step is not None:
            on_step(training)

    private_optimizer.attach_step_hook(account)
    return training


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _LinearClipping:
    """Per-sample clipping without per-sample gradients, for models whose trainable
    parameters all belong to nn.Linear layers applied once each to [batch, features].

    For such a layer the per-sample gradient of the weight is the outer product b_i a_i^T
    of the sample's output gradient b_i and input a_i, so its squared norm is
    |a_i|^2 |b_i|^2 (plus |b_i|^2 for the bias) and the clipped sum is (c * b)^T a with
    c_i = min(1, C / (|g_i| + 1e-6)): Opacus's flat clipping, exactly, from one backward
    pass to the layer outputs (Goodfellow 2015; Li et al. 2022's ghost norms). Noise and
    scaling are Opacus's: N(0, (sigma*C)^2) per coordinate, divided by the expected batch.
    Anything else (a layer used twice, inputs with more dimensions) falls back to Opacus.
    """

    def __init__(self, model: nn.Module, layers: list[nn.Linear]) -> None:
        self._model = model
        self._layers = layers
        self._seen: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] | None = None
        for layer in layers:
            layer.register_forward_hook(self._capture)

    @classmethod
    def for_model(cls, model: nn.Module) -> _LinearClipping | None:
        layers = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own and type(module) is not nn.Linear:
                return None
            if own:
                layers.append(module)
        return cls(model, layers) if layers else None  # type: ignore[arg-type]

    def _capture(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if self._seen is not None:
            self._seen.append((module, args[0], output))  # type: ignore[arg-type]

    def step(
        self,
        batch: Sequence[torch.Tensor],
        loss_fn: LossFn,
        *,
        clip: float,
        std: float,
        expected_batch_size: int,
        generator: torch.Generator,
    ) -> float | None:
        """Set every parameter's .grad to the clipped, noised, scaled sum; the batch loss.
        None when the model is not a plain stack of linear layers (nothing is changed)."""
        rows = int(batch[-1].shape[0])
        self._seen = []
        try:
            loss = loss_fn(self._forward(batch[:-1]), batch[-1])
        finally:
            seen, self._seen = self._seen, None
        if sorted(map(id, (m for m, _, _ in seen))) != sorted(map(id, self._layers)) or any(
            a.dim() != 2 or z.dim() != 2 for _, a, z in seen
        ):
            return None
        backprops = torch.autograd.grad(loss, [z for _, _, z in seen])
        squared = torch.zeros(rows, dtype=loss.dtype)
        parts = []
        for (layer, a, _), grad in zip(seen, backprops, strict=True):
            b = grad * rows  # the loss is a mean over the batch: undo it per sample
            a = a.detach()
            b_sq = b.pow(2).sum(dim=1)
            if layer.weight.requires_grad:
                squared += a.pow(2).sum(dim=1) * b_sq
            if layer.bias is not None and layer.bias.requires_grad:
                squared += b_sq
            parts.append((layer, a, b))
        factor = (clip / (squared.sqrt() + 1e-6)).clamp(max=1.0).unsqueeze(1)
        for layer, a, b in parts:
            scaled = b * factor
            if layer.weight.requires_grad:
                summed = scaled.T @ a
                noise = torch.normal(0.0, std, summed.shape, generator=generator, dtype=summed.dtype)
                layer.weight.grad = (summed + noise) / expected_batch_size
            if layer.bias is not None and layer.bias.requires_grad:
                summed = scaled.sum(dim=0)
                noise = torch.normal(0.0, std, summed.shape, generator=generator, dtype=summed.dtype)
                layer.bias.grad = (summed + noise) / expected_batch_size
        return float(loss.detach())

    def _forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        model = self._model
        model.train()
        return model(*inputs)


class DpSgd(_SgdSpending):
    """DP-SGD for a worker that trains `model` on its own rows, round after round.

    Built once per job (the per-sample hooks are attached once); every round calls
    `train` with a fresh optimizer. The noise multiplier is calibrated to spend
    `target_epsilon` over `planned_steps` (or `noise_multiplier` is given); `fits(steps)`
    says whether `steps` more stay within `max_epsilon` (the policy's budget). Sampling and
    noise draw from the OS's secret randomness; `seed` fixes them for tests and benchmarks only.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Sequence[torch.Tensor],
        *,
        batch_size: int,
        delta: float,
        planned_steps: int,
        max_grad_norm: float,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        max_epsilon: float | None = None,
        seed: int | None = None,
    ) -> None:
        if (target_epsilon is None) == (noise_multiplier is None):
            raise UsageError("give exactly one of target_epsilon and noise_multiplier")
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise UsageError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
        check_model(model)
        rows = int(train[-1].shape[0])
        if not is_int(batch_size) or batch_size < 1:
            raise UsageError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self._train = tuple(train)
        self._steps_per_epoch = -(-rows // batch_size)
        # As Opacus's DPDataLoader: rate 1 / (batches per epoch), so an epoch is as many steps.
        super().__init__(
            delta=delta, sample_rate=1.0 / self._steps_per_epoch, steps=planned_steps,
            target_epsilon=target_epsilon, noise_multiplier=noise_multiplier, max_epsilon=max_epsilon,
        )  # fmt: skip
        self.expected_batch_size = max(1, round(rows * self.sample_rate))
        self.max_grad_norm = float(max_grad_norm)
        self.planned_steps = planned_steps
        # The batches and the noise must be unpredictable to anyone but this enclave: a seed
        # from the job file would let whoever reads it recompute and subtract the noise.
        self._generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        self._model = model
        self._module: GradSampleModule | None = None  # hooks attached at the first round, not before the checks
        self._linear = _LinearClipping.for_model(model)

    @property
    def module(self) -> GradSampleModule:
        """The model with Opacus's per-sample gradient hooks (shares its parameters)."""
        if self._module is None:
            self._model.train()
            try:
                self._module = GradSampleModule(self._model)
            except NotImplementedError as exc:
                raise UsageError(f"Opacus cannot compute per-sample gradients of this model: {exc}") from None
        return self._module

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    def _poisson_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch of Poisson sampling (every row in each batch with probability
        sample_rate, independently), as Opacus's UniformWithReplacementSampler, but slicing
        the tensors at once instead of collating rows one by one."""
        rows = int(self._train[-1].shape[0])
        for _ in range(self._steps_per_epoch):
            picked = torch.nonzero(torch.rand(rows, generator=self._generator) < self.sample_rate).reshape(-1)
            yield tuple(t[picked] for t in self._train)

    def planned_epsilon(self) -> float:
        """The epsilon the planned steps spend (the refusal check before training)."""
        return self.epsilon_after(self.planned_steps, from_start=True)

    def train(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        loss_fn: LossFn,
        penalty: Callable[[], torch.Tensor] | None = None,
    ) -> float:
        """`epochs` passes of Poisson-sampled private steps; the mean batch loss.

        `penalty()` (FedProx's proximal term) is a function of the parameters only, not
        of any record, so its gradient is added after clipping and noise.
        """
        private = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            generator=self._generator,
        )
        private.attach_step_hook(
            lambda optim: self.accountant.step(noise_multiplier=optim.noise_multiplier, sample_rate=self.sample_rate)
        )
        total, batches = 0.0, 0
        for _ in range(epochs):
            for batch in self._poisson_batches():
                private.zero_grad(set_to_none=True)
                if batch[-1].shape[0] == 0:
                    # No row sampled: the step still releases noise (its absence would tell).
                    self._noise_only_step(private)
                    continue
                if self._linear is not None:
                    loss = self._linear.step(
                        batch,
                        loss_fn,
                        clip=self.max_grad_norm,
                        std=self.noise_multiplier * self.max_grad_norm,
                        expected_batch_size=self.expected_batch_size,
                        generator=self._generator,
                    )
                    if loss is not None:
                        self._add_penalty(penalty, private.params)
                        optimizer.step()
                        self.spend()
                        total += loss
                        batches += 1
                        continue
                    self._linear = None  # the model is not a plain stack of linear layers: Opacus from here
                module = self.module
                module.train()
                loss = loss_fn(module(*batch[:-1]), batch[-1])  # type: ignore[assignment]
                loss.backward()  # type: ignore[union-attr]
                if private.pre_step():
                    self._add_penalty(penalty, private.params)
                    optimizer.step()
                total += float(loss.detach())  # type: ignore[union-attr]
                batches += 1
        private.zero_grad(set_to_none=True)
        return total / max(batches, 1)

    @staticmethod
    def _add_penalty(penalty: Callable[[], torch.Tensor] | None, params: Sequence[torch.Tensor]) -> None:
        if penalty is None:
            return
        extra = torch.autograd.grad(penalty(), list(params), allow_unused=True)
        for param, grad in zip(params, extra, strict=True):
            if grad is not None:
                param.grad += grad  # type: ignore[operator]

    def _noise_only_step(self, private: DPOptimizer) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for param in private.params:
            noise = torch.normal(0.0, std, param.shape, generator=self._generator, dtype=param.dtype)
            param.grad = noise / self.expected_batch_size
        private.original_optimizer.step()
        self.spend()
