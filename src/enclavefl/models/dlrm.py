"""DLRM (Naumov et al. 2019): embeddings + bottom MLP, pairwise dot interaction, top MLP.

The forward pass returns LOGITS; exactly one sigmoid is applied, either by the loss
(BCEWithLogitsLoss) or by `predict`. CCZoo's DLRM sample ends its top MLP in a sigmoid
and then calls `binary_crossentropy(..., from_logits=True)`, so it applies the sigmoid
twice: its loss is computed on sigmoid(sigmoid(z)), whose range (0.5, 0.73) can never
express a confident prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from enclavefl.errors import UsageError
from enclavefl.models.mlp import mlp

CRITEO_NUM_DENSE = 13
CRITEO_NUM_SPARSE = 26


class DLRM(nn.Module):
    """DLRM for Criteo-like data: dense float [N, num_dense], sparse int64 [N, num_sparse].

    `vocab_sizes` is one size per categorical field (an int means the same size for
    `num_sparse` fields). `bottom_mlp` is the full bottom architecture after the input
    (its last width must equal `embedding_dim`); `top_mlp` ends with the number of logits.
    `sparse=True` makes the embedding gradients sparse (only touched rows), for SGD or
    SparseAdam and for horizontal FL that sends only those rows.
    """

    def __init__(
        self,
        vocab_sizes: int | Sequence[int] = 10_000,
        *,
        num_dense: int = CRITEO_NUM_DENSE,
        num_sparse: int = CRITEO_NUM_SPARSE,
        embedding_dim: int = 16,
        bottom_mlp: Sequence[int] = (512, 256, 64, 16),
        top_mlp: Sequence[int] = (512, 256, 1),
        sparse: bool = False,
    ) -> None:
        super().__init__()
        sizes = [int(vocab_sizes)] * num_sparse if isinstance(vocab_sizes, int) else list(vocab_sizes)
        if len(sizes) != num_sparse or min(sizes, default=0) < 1:
            raise UsageError(
                f"vocab_sizes must hold {num_sparse} sizes >= 1, got {len(sizes)} ({sizes[:4]}...)"
            )
        if not bottom_mlp or bottom_mlp[-1] != embedding_dim:
            raise UsageError(
                f"the bottom MLP must end with embedding_dim={embedding_dim}, got {list(bottom_mlp)}"
            )
        if not top_mlp:
            raise UsageError("top_mlp must name at least the output width")
        self.embeddings = nn.ModuleList(nn.Embedding(size, embedding_dim, sparse=sparse) for size in sizes)
        for table, size in zip(self.embeddings, sizes, strict=True):
            # The DLRM reference initialization: U(-sqrt(1/n), sqrt(1/n)) per table.
            bound = math.sqrt(1.0 / size)
            nn.init.uniform_(table.weight, -bound, bound)  # type: ignore[arg-type]
        # The bottom output is a feature vector like the embeddings, hence ReLU after it.
        self.bottom = nn.Sequential(mlp(num_dense, bottom_mlp[:-1], bottom_mlp[-1]), nn.ReLU())
        num_vectors = num_sparse + 1
        rows, cols = torch.triu_indices(num_vectors, num_vectors, offset=1)
        self.register_buffer("_pair_rows", rows, persistent=False)
        self.register_buffer("_pair_cols", cols, persistent=False)
        self.top = mlp(embedding_dim + rows.numel(), top_mlp[:-1], top_mlp[-1])
        self.num_dense = num_dense
        self.num_sparse = num_sparse

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Logits [N, top_mlp[-1]] (no sigmoid)."""
        if dense.dim() != 2 or dense.shape[1] != self.num_dense:
            raise UsageError(f"dense input must be [N, {self.num_dense}], got {list(dense.shape)}")
        if sparse.dim() != 2 or sparse.shape[1] != self.num_sparse:
            raise UsageError(f"sparse input must be [N, {self.num_sparse}], got {list(sparse.shape)}")
        bottom = self.bottom(dense)
        vectors = [bottom] + [table(sparse[:, i]) for i, table in enumerate(self.embeddings)]
        stacked = torch.stack(vectors, dim=1)
        dots = torch.bmm(stacked, stacked.transpose(1, 2))
        interactions = dots[:, self._pair_rows, self._pair_cols]  # type: ignore[index]
        return self.top(torch.cat([bottom, interactions], dim=1))

    @torch.no_grad()
    def predict(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Click probabilities: sigmoid of the logits (the one and only sigmoid)."""
        return torch.sigmoid(self.forward(dense, sparse))
