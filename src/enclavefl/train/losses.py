"""Training losses computed from logits, shared by horizontal workers and the vertical leader.

`default_loss` infers the task from the logits' shape (one column: binary, several:
multi-class), which is what every job did before tasks were named.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from enclavefl.errors import UsageError

__all__ = ["default_loss"]


def default_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits for one logit per example, mean cross-entropy for several."""
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), labels.reshape(-1).to(logits.dtype))
    if logits.dim() != 2:
        raise UsageError(f"expected logits [N] or [N, C], got shape {list(logits.shape)}")
    return F.cross_entropy(logits, labels.long())
