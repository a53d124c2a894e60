"""The built-in optimizers without `torch.optim`: SGD, Adam and Adagrad.

`torch.optim.Optimizer.__init__` (and its `zero_grad`, `state_dict`, `load_state_dict`) is
wrapped by `torch._disable_dynamo`, which imports all of `torch._dynamo` the first time any
optimizer is built: 1.5 to 3 s of CPU (far more on a loaded machine) in every horizontal
worker and every vertical party. These classes perform the same arithmetic as
`torch.optim.SGD`, `torch.optim.Adam` and `torch.optim.Adagrad` with their defaults (the
single-tensor update torch uses on CPU, operation for operation), so results are
bit-identical, without that import. Their `state_dict()` is torch's format, index for
index: a checkpoint written by the torch optimizer loads into the plain one and back.
User code may use any optimizer it likes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from enclavefl.errors import UsageError

__all__ = ["PlainAdagrad", "PlainAdam", "PlainOptimizer", "PlainSGD", "plain_sgd_factory"]


def _scalar_dtype() -> torch.dtype:
    """The dtype torch keeps an optimizer's `step` counter in (CPU, not fused)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class PlainOptimizer(ABC):
    """One parameter group and its per-parameter state, checkpointed in torch's format:
    `{"state": {index: {...}}, "param_groups": [{hyper-parameters..., "params": [indices]}]}`.

    Subclasses name torch's group keys (`FIXED`: settings of which this class implements
    only the value given; `TUNED`: the ones it reads from the group) and the state keys of
    one parameter (`STATE`). torch's implementation switches (`IMPLEMENTATION`: foreach,
    fused...) change how, not what, torch computes: saved with torch's defaults, any value
    loads."""

    IMPLEMENTATION: ClassVar[tuple[str, ...]] = ("foreach", "capturable", "differentiable", "fused")

    NAME: ClassVar[str]
    FIXED: ClassVar[dict[str, Any]]
    TUNED: ClassVar[tuple[str, ...]]
    STATE: ClassVar[tuple[str, ...]]

    def __init__(self, params: Iterable[torch.Tensor], group: dict[str, Any]) -> None:
        # Every parameter given keeps its index, trainable or not: torch numbers them so.
        self.params = list(params)
        for param in self.params:
            if param.is_complex():
                raise UsageError(f"{self.NAME}: complex parameters are not supported")
        self._check(group)
        self.group = group
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    @abstractmethod
    def _check(self, group: Mapping[str, Any]) -> None:
        """Raise UsageError unless the hyper-parameters are valid for this optimizer."""

    @abstractmethod
    def step(self) -> None:
        """Update the parameters that have a gradient, once."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (`set_to_none=False`: zero them in place), as torch does."""
        for param in self.params:
            grad = param.grad
            if grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                if grad.grad_fn is not None:
                    grad.detach_()
                else:
                    grad.requires_grad_(False)
                grad.zero_()

    def _grads(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(index, parameter, dense gradient) of the parameters that have a gradient;
        checked before any update, as torch does."""
        grads = [(i, p, p.grad) for i, p in enumerate(self.params) if p.grad is not None]
        if any(grad.is_sparse for _, _, grad in grads):
            raise UsageError(f"{self.NAME} does not support sparse gradients")
        return grads

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """torch's `param_groups`, to read (set hyper-parameters through `load_state_dict`)."""
        return [{**self.FIXED, **self.group, "params": self.params}]

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict (state tensors by reference, as torch gives them)."""
        return {
            "state": {i: dict(state) for i, state in self.state.items()},
            "param_groups": [{**self.FIXED, **self.group, "params": list(range(len(self.params)))}],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict of this optimizer or of its torch twin. As torch does, the
        saved hyper-parameters replace the current ones; settings this class does not
        implement, another parameter count or mismatched state raise UsageError."""
        what = f"{self.NAME} state"
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        saved_state = state_dict.get("state") if isinstance(state_dict, Mapping) else None
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], Mapping) \
                or not isinstance(saved_state, Mapping):
            raise UsageError(f"{what}: not an optimizer state dict with one parameter group")
        group = groups[0]
        if len(group.get("params", ())) != len(self.params):
            raise UsageError(f"{what}: saved for {len(group.get('params', ()))} parameters, "
                             f"this optimizer has {len(self.params)}")
        unsupported = {k: group[k] for k, v in self.FIXED.items()
                       if k in group and k not in self.IMPLEMENTATION and group[k] != v}
        if unsupported:
            raise UsageError(f"{what}: saved with settings this optimizer does not implement: {unsupported}")
        missing = [k for k in self.TUNED if k not in group]
        if missing:
            raise UsageError(f"{what}: the saved parameter group lacks {missing}")
        tuned = {k: group[k] for k in self.TUNED}
        self._check(tuned)
        # The saved state is keyed by position in the saved group's list of indices.
        position = {index: n for n, index in enumerate(group["params"])}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for index, values in saved_state.items():
            if index not in position or not isinstance(values, Mapping):
                raise UsageError(f"{what}: state for parameter {index!r}, which the group does not hold")
            if not values:
                continue  # torch keeps an empty entry for a parameter it touched without state
            n = position[index]
            if set(values) != set(self.STATE):
                raise UsageError(f"{what}: parameter {n} has state {sorted(values)}, expected {sorted(self.STATE)}")
            state[n] = {key: self._load_value(key, values[key], self.params[n], what) for key in self.STATE}
        self.group = tuned
        self.state = state

    @staticmethod
    def _load_value(key: str, value: Any, param: torch.Tensor, what: str) -> torch.Tensor:
        if key == "step":  # a CPU scalar tensor, as torch keeps it; old checkpoints may hold a number
            if isinstance(value, torch.Tensor):
                return value.detach().clone()
            return torch.tensor(float(value), dtype=_scalar_dtype())
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            raise UsageError(f"{what}: {key} does not have its parameter's shape {tuple(param.shape)}")
        # As torch: floating state takes its parameter's dtype and device.
        return value.detach().to(dtype=param.dtype, device=param.device, copy=True)


class PlainSGD(PlainOptimizer):
    """`torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)`'s
    update, step for step (dampening 0, no Nesterov); dense and sparse gradients."""

    NAME = "SGD"
    FIXED: ClassVar[dict[str, Any]] = {"dampening": 0, "nesterov": False, "maximize": False, "foreach": None,
                                       "differentiable": False, "fused": None}
    TUNED = ("lr", "momentum", "weight_decay")
    STATE = ("momentum_buffer",)

    def __init__(
        self, params: Iterable[torch.Tensor], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _check(self, group: Mapping[str, Any]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if not lr > 0 or not 0 <= momentum < 1 or not weight_decay >= 0:
            raise UsageError(f"SGD needs lr > 0, 0 <= momentum < 1, weight_decay >= 0; "
                             f"got {lr}, {momentum}, {weight_decay}")

    @torch.no_grad()
    def step(self) -> None:
        lr, momentum, weight_decay = self.group["lr"], self.group["momentum"], self.group["weight_decay"]
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            if momentum != 0:
                state = self.state.get(i)
                if state is None:
                    buffer = grad.detach().clone()
                    self.state[i] = {"momentum_buffer": buffer}
                else:
                    buffer = state["momentum_buffer"]
                    buffer.mul_(momentum).add_(grad)
                grad = buffer
            param.add_(grad, alpha=-lr)


class PlainAdam(PlainOptimizer):
    """`torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)`'s
    update (no amsgrad, not maximizing, weight decay coupled), bit for bit; dense gradients."""

    NAME = "Adam"
    FIXED: ClassVar[dict[str, Any]] = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                                       "differentiable": False, "fused": None, "decoupled_weight_decay": False}
    TUNED = ("lr", "betas", "eps", "weight_decay")
    STATE = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _check(self, group: Mapping[str, Any]) -> None:
        lr, betas, eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not (isinstance(betas, tuple | list) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise UsageError(f"Adam needs two betas in [0, 1), got {betas!r}")
        if not lr > 0 or not eps >= 0 or not weight_decay >= 0:
            raise UsageError(f"Adam needs lr > 0, eps >= 0, weight_decay >= 0; got {lr}, {eps}, {weight_decay}")

    @torch.no_grad()
    def step(self) -> None:
        lr, eps, weight_decay = self.group["lr"], self.group["eps"], self.group["weight_decay"]
        beta1, beta2 = self.group["betas"]
        for i, param, grad in self._grads():
            state = self.state.get(i)
            if state is None:
                state = self.state[i] = {
                    "step": torch.tensor(0.0, dtype=_scalar_dtype()),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }
            exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            # torch.optim.adam._single_tensor_adam, its non-capturable branch, in its order.
            step_t += 1
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)


class PlainAdagrad(PlainOptimizer):
    """`torch.optim.Adagrad(params, lr=lr, eps=eps, weight_decay=weight_decay)`'s update
    (lr_decay 0, initial accumulator 0, not maximizing), bit for bit; dense gradients."""

    NAME = "Adagrad"
    FIXED: ClassVar[dict[str, Any]] = {"lr_decay": 0, "initial_accumulator_value": 0, "foreach": None,
                                       "maximize": False, "differentiable": False, "fused": None}
    TUNED = ("lr", "eps", "weight_decay")
    STATE = ("step", "sum")

    def __init__(
        self, params: Iterable[torch.Tensor], *, lr: float = 1e-2, eps: float = 1e-10, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        # As torch.optim.Adagrad: every parameter's state exists from the start.
        self.state = {
            i: {"step": torch.tensor(0.0, dtype=_scalar_dtype()),
                "sum": torch.full_like(p, 0, memory_format=torch.preserve_format)}
            for i, p in enumerate(self.params)
        }

    def _check(self, group: Mapping[str, Any]) -> None:
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        if not lr > 0 or not eps >= 0 or not weight_decay >= 0:
            raise UsageError(f"Adagrad needs lr > 0, eps >= 0, weight_decay >= 0; got {lr}, {eps}, {weight_decay}")

    @torch.no_grad()
    def step(self) -> None:
        lr, eps, weight_decay = self.group["lr"], self.group["eps"], self.group["weight_decay"]
        for i, param, grad in self._grads():
            state = self.state[i]
            # torch.optim.adagrad._single_tensor_adagrad, its dense branch, in its order.
            state["step"] += 1
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            state["sum"].addcmul_(grad, grad, value=1)
            std = state["sum"].sqrt().add_(eps)
            param.addcdiv_(grad, std, value=-float(lr))  # torch's lr / (1 + (step - 1) * lr_decay), lr_decay 0


def plain_sgd_factory(lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> Callable[[nn.Module], PlainSGD]:
    """A fresh `PlainSGD` over a model's trainable parameters: the built-in worker's and
    gradient server's optimizer factory (`enclavefl.train.torch.sgd_factory` and
    `enclavefl.hfl.strategies.sgd` are the torch.optim ones, with the same indices)."""
    PlainSGD([], lr=lr, momentum=momentum, weight_decay=weight_decay)  # check the values once, now

    def make(model: nn.Module) -> PlainSGD:
        params = [p for p in model.parameters() if p.requires_grad]
        return PlainSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    return make
