"""Plain momentum SGD without `torch.optim`: the built-in local training step.

`torch.optim.Optimizer.__init__` is wrapped by `torch._disable_dynamo`, which imports all
of `torch._dynamo` the first time any optimizer is built: about 3 s of CPU (far more on a
loaded machine) that landed in the first round of every worker. `PlainSGD` performs the
same arithmetic as `torch.optim.SGD(params, lr, momentum, weight_decay)` (dampening 0, no
Nesterov; the single-tensor update torch uses on CPU, in the same order), so results are
bit-identical, without that import. User training loops may use any optimizer they like.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from enclavefl.errors import UsageError

__all__ = ["PlainSGD", "plain_sgd_factory"]


class PlainSGD:
    """`torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)`'s
    update, step for step; dense and sparse gradients."""

    def __init__(
        self, params: Iterable[torch.Tensor], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        if not lr > 0 or not 0 <= momentum < 1 or not weight_decay >= 0:
            raise UsageError(f"local SGD needs lr > 0, 0 <= momentum < 1, weight_decay >= 0; "
                             f"got {lr}, {momentum}, {weight_decay}")
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (always set to None, as torch's default)."""
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                buffer = self._buffers[i]
                if buffer is None:
                    buffer = self._buffers[i] = grad.detach().clone()
                else:
                    buffer.mul_(self.momentum).add_(grad)
                grad = buffer
            param.add_(grad, alpha=-self.lr)


def plain_sgd_factory(lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> Callable[[nn.Module], PlainSGD]:
    """A fresh `PlainSGD` over a model's trainable parameters: the built-in worker's
    optimizer factory (`enclavefl.train.torch.sgd_factory` is the torch.optim one)."""
    PlainSGD([], lr=lr, momentum=momentum, weight_decay=weight_decay)  # check the values once, now

    def make(model: nn.Module) -> PlainSGD:
        return PlainSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    return make
