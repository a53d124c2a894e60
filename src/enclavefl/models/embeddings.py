"""Embedding helpers: several categorical fields in one table, and finding embedding weights.

Horizontal FL sends only the rows of an embedding table that a batch touched, so the
transport needs to know which parameters are embedding tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from enclavefl.errors import UsageError


class FieldEmbedding(nn.Module):
    """One embedding per categorical field, stored as a single table with per-field offsets.

    Input: int64 [N, num_fields], field f's values in [0, vocab_sizes[f]). Output:
    [N, num_fields, dim]. Equivalent to num_fields separate tables but one lookup, which
    matters for the 512-field wide&deep reference.
    """

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        dim: int,
        *,
        sparse: bool = False,
        init_scale: float | None = None,
    ) -> None:
        super().__init__()
        sizes = [int(v) for v in vocab_sizes]
        if not sizes or min(sizes) < 1:
            raise UsageError(f"vocab_sizes must be a non-empty list of sizes >= 1, got {sizes[:8]}")
        self.vocab_sizes = tuple(sizes)
        offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(sum(sizes), dim, sparse=sparse)
        if init_scale is not None:
            nn.init.uniform_(self.table.weight, -init_scale, init_scale)

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_fields:
            raise UsageError(
                f"expected categorical input of shape [N, {self.num_fields}], got {list(x.shape)}"
            )
        return self.table(x + self.offsets)  # type: ignore[operator]


def embedding_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in `model.named_parameters()`) of every nn.Embedding / nn.EmbeddingBag weight."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            names.append(f"{prefix}.weight" if prefix else "weight")
    return names
