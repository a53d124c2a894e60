"""The vertical wide&deep split of CCZoo's Fedlearner reference (example/wide_n_deep).

Follower: embeddings of its categorical fields, concatenated, then FC 64 + ReLU; it sends
these activations to the leader. Leader: its own embeddings, FC 256 + ReLU, FC 64,
concatenated with every follower's activations, then the output layer.

Defaults follow the reference: 512 fields per party with 101 values each, embedding
dimension 32 on the leader and 16 on the follower, embeddings initialized U(-0.01, 0.01).
Two deliberate differences: one field holds one value per example (the reference reads
variable-length lists with a mean combiner, but its data has exactly one value), and the
output is ONE logit for BCEWithLogitsLoss where the reference uses two softmax logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from enclavefl.errors import UsageError
from enclavefl.models.embeddings import FieldEmbedding

_EMBEDDING_INIT = 0.01


class WideDeepFollower(nn.Module):
    """Follower bottom model: int64 [N, num_fields] -> activations [N, out_features]."""

    def __init__(
        self,
        num_fields: int = 512,
        vocab_size: int = 101,
        embedding_dim: int = 16,
        out_features: int = 64,
        *,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.embedding = FieldEmbedding(
            [vocab_size] * num_fields, embedding_dim, sparse=sparse, init_scale=_EMBEDDING_INIT
        )
        self.fc = nn.Linear(num_fields * embedding_dim, out_features)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.embedding(x).flatten(1)))


class WideDeepLeader(nn.Module):
    """Leader top model: own int64 [N, num_fields] plus follower activations -> logits [N, 1]."""

    def __init__(
        self,
        num_fields: int = 512,
        vocab_size: int = 101,
        embedding_dim: int = 32,
        hidden: tuple[int, int] = (256, 64),
        follower_dims: Sequence[int] = (64,),
        *,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        if len(hidden) != 2:
            raise UsageError(f"hidden must be two widths (FC1, FC2), got {list(hidden)}")
        self.embedding = FieldEmbedding(
            [vocab_size] * num_fields, embedding_dim, sparse=sparse, init_scale=_EMBEDDING_INIT
        )
        self.fc1 = nn.Linear(num_fields * embedding_dim, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.follower_dims = tuple(int(d) for d in follower_dims)
        self.output = nn.Linear(hidden[1] + sum(self.follower_dims), 1)

    def forward(self, x: torch.Tensor, follower_activations: Sequence[torch.Tensor]) -> torch.Tensor:
        got = tuple(a.shape[-1] for a in follower_activations)
        if got != self.follower_dims:
            raise UsageError(
                f"follower activation widths {got} do not match follower_dims {self.follower_dims}"
            )
        own = self.fc2(torch.relu(self.fc1(self.embedding(x).flatten(1))))
        return self.output(torch.cat([own, *follower_activations], dim=1))


class UnsplitWideDeep(nn.Module):
    """Leader and followers composed in one process (the non-federated baseline)."""

    def __init__(self, leader: WideDeepLeader, followers: Sequence[WideDeepFollower]) -> None:
        super().__init__()
        dims = tuple(f.out_features for f in followers)
        if dims != leader.follower_dims:
            raise UsageError(f"followers produce widths {dims}, leader expects {leader.follower_dims}")
        self.leader = leader
        self.followers = nn.ModuleList(followers)

    def forward(self, leader_x: torch.Tensor, follower_xs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(follower_xs) != len(self.followers):
            raise UsageError(f"expected inputs for {len(self.followers)} followers, got {len(follower_xs)}")
        activations = [follower(x) for follower, x in zip(self.followers, follower_xs, strict=True)]
        return self.leader(leader_x, activations)


def unsplit_wide_deep(
    num_fields: int = 512,
    vocab_size: int = 101,
    num_followers: int = 1,
    *,
    sparse: bool = False,
) -> UnsplitWideDeep:
    """An UnsplitWideDeep with reference-sized halves (for `build_model("wide_deep")`)."""
    followers = [WideDeepFollower(num_fields, vocab_size, sparse=sparse) for _ in range(num_followers)]
    leader = WideDeepLeader(
        num_fields, vocab_size, follower_dims=[f.out_features for f in followers], sparse=sparse
    )
    return UnsplitWideDeep(leader, followers)
