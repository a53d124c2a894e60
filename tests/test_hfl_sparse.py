"""Embedding tables as sparse rows: conversions, averaging, pulls, and sparse server steps
that must equal dense ones (or torch's own sparse optimizers) on the same data."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from enclavefl.errors import UsageError
from enclavefl.hfl.sparse import (
    SparseRows,
    add_rows,
    as_grad,
    grad_form,
    pull_rows,
    weighted_average,
    write_rows,
)
from enclavefl.hfl.state import embedding_names, load_state, model_state, parameter_names
from enclavefl.hfl.strategies import (
    FedAvg,
    GradContribution,
    SyncSGD,
    UpdateContribution,
    grad_contribution,
    update_contribution,
)


# Parties share the two cores: one torch thread each (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyRec(nn.Module):
    """A DLRM-shaped model: an embedding table, an embedding bag, dense features, one logit."""

    def __init__(self, sparse: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.table = nn.Embedding(40, 4, sparse=sparse)
        self.bag = nn.EmbeddingBag(30, 4, mode="sum", sparse=sparse)
        self.top = nn.Linear(4 + 4 + 3, 1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor, bag_ids: torch.Tensor) -> torch.Tensor:
        return self.top(torch.cat([self.table(ids), self.bag(bag_ids), dense], dim=1)).squeeze(1)


def rec_batch(seed: int, size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    # Few distinct ids, so batches touch some rows several times and leave others alone.
    return (
        torch.randn(size, 3, generator=g),
        torch.randint(0, 12, (size,), generator=g),
        torch.randint(0, 10, (size, 2), generator=g),
        torch.randint(0, 2, (size,), generator=g).float(),
    )


def union(batches: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=False))


def loss_of(model: nn.Module, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
    dense, ids, bag_ids, y = data
    return F.binary_cross_entropy_with_logits(model(dense, ids, bag_ids), y)


# -- SparseRows ---------------------------------------------------------------------


def test_from_torch_sparse_matches_the_dense_gradient() -> None:
    sparse_model, dense_model = TinyRec(sparse=True), TinyRec(sparse=False)
    data = rec_batch(0, 9)
    loss_of(sparse_model, data).backward()
    loss_of(dense_model, data).backward()
    for name in ("table.weight", "bag.weight"):
        grad = dict(sparse_model.named_parameters())[name].grad
        assert grad.is_sparse
        rows = SparseRows.from_torch_sparse(grad)
        dense = dict(dense_model.named_parameters())[name].grad
        assert torch.allclose(rows.to_dense(), dense, atol=1e-7)
        assert torch.equal(rows.indices, torch.unique(rows.indices))  # coalesced: no repeats
        assert rows.nbytes < dense.numel() * 4
    with pytest.raises(UsageError, match="1 sparse and 1 dense dimension"):
        SparseRows.from_torch_sparse(torch.zeros(3, 2))


def test_from_dense_keeps_only_nonzero_rows_and_coalesce_sums_repeats() -> None:
    table = torch.zeros(6, 2)
    table[1] = torch.tensor([0.0, 2.0])
    table[4] = torch.tensor([-1.0, 0.5])
    rows = SparseRows.from_dense(table)
    assert rows.indices.tolist() == [1, 4] and torch.equal(rows.to_dense(), table)
    repeated = SparseRows(torch.tensor([3, 1, 3]), torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.5, -1.0]]), 5)
    merged = repeated.coalesce()
    assert merged.indices.tolist() == [1, 3]
    assert merged.values.tolist() == [[2.0, 0.0], [1.5, 0.0]]
    assert torch.equal(merged.to_dense(), repeated.to_dense())
    assert torch.equal(repeated.to_torch_sparse().to_dense(), repeated.to_dense())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SparseRows(torch.tensor([0, 5]), torch.zeros(2, 3), 5), r"must lie in \[0, 5\)"),
        (lambda: SparseRows(torch.tensor([-1]), torch.zeros(1, 3), 5), r"must lie in \[0, 5\)"),
        (lambda: SparseRows(torch.tensor([0, 1], dtype=torch.int32), torch.zeros(2, 3), 5), "int64"),
        (lambda: SparseRows(torch.tensor([0, 1]), torch.zeros(3, 3), 5), r"values must be \[k=2, dim\]"),
        (lambda: SparseRows(torch.tensor([0]), torch.zeros(1, 3, dtype=torch.int64), 5), "floating point"),
        (lambda: SparseRows(torch.tensor([0]), torch.zeros(1, 3), 0), "num_rows must be an int >= 1"),
    ],
)
def test_sparse_rows_validation(make: Callable[[], SparseRows], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        make()


def test_weighted_average_over_the_union_equals_dense_averaging() -> None:
    g = torch.Generator().manual_seed(1)
    parts = [
        SparseRows(torch.tensor(idx), torch.randn(len(idx), 3, generator=g), 10)
        for idx in ([0, 2, 2, 7], [2, 5], [9])
    ]
    weights = [3.0, 1.0, 4.0]
    averaged = weighted_average(parts, weights)
    dense = sum(w * p.to_dense() for w, p in zip(weights, parts, strict=False)) / sum(weights)
    assert averaged.indices.tolist() == [0, 2, 5, 7, 9]
    assert torch.allclose(averaged.to_dense(), dense, atol=1e-7)
    with pytest.raises(UsageError, match="zero SparseRows"):
        weighted_average([], [])
    with pytest.raises(UsageError, match="weights must be > 0"):
        weighted_average(parts, [1.0, 0.0, 1.0])
    with pytest.raises(UsageError, match=r"cannot average SparseRows of torch.float32 \[10, 3\]"):
        weighted_average([parts[0], SparseRows(torch.tensor([0]), torch.zeros(1, 3), 11)], [1.0, 1.0])


def test_pull_and_write_rows_move_only_the_rows_a_batch_needs() -> None:
    server = torch.randn(20, 4, generator=torch.Generator().manual_seed(2))
    worker = torch.zeros(20, 4)
    batch_ids = torch.tensor([[3, 7], [7, 19], [3, 3]])
    pulled = pull_rows(server, batch_ids)
    assert pulled.indices.tolist() == [3, 7, 19]
    write_rows(worker, pulled)
    touched = torch.zeros(20, dtype=torch.bool)
    touched[[3, 7, 19]] = True
    assert torch.equal(worker[touched], server[touched])
    assert not worker[~touched].any()
    # A worker looks up only pulled rows, so its forward pass equals the server's.
    assert torch.equal(F.embedding(batch_ids, worker), F.embedding(batch_ids, server))
    with pytest.raises(UsageError, match="unique indices"):
        write_rows(worker, SparseRows(torch.tensor([1, 1]), torch.zeros(2, 4), 20))
    with pytest.raises(UsageError, match=r"cannot be written into a torch.float32 \[20, 4\] table"):
        write_rows(worker, SparseRows(torch.tensor([1]), torch.zeros(1, 4), 21))
    with pytest.raises(UsageError, match="int64"):
        pull_rows(server, batch_ids.int())
    add_rows(worker, SparseRows(torch.tensor([0, 0]), torch.ones(2, 4), 20), alpha=0.5)
    assert worker[0].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_grad_form_follows_what_each_torch_optimizer_accepts() -> None:
    p = [nn.Parameter(torch.zeros(4, 2))]
    assert grad_form(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == "sparse-ok"
    assert grad_form(torch.optim.SGD(p, lr=0.1, weight_decay=1e-4)) == "dense"
    assert grad_form(torch.optim.Adagrad(p, lr=0.1)) == "sparse-ok"
    assert grad_form(torch.optim.SparseAdam(p, lr=0.1)) == "sparse-only"
    assert grad_form(torch.optim.Adam(p, lr=0.1)) == "dense"
    rows = SparseRows(torch.tensor([1]), torch.ones(1, 2), 4)
    assert as_grad(rows, "sparse-ok").is_sparse and not as_grad(rows, "dense").is_sparse
    assert as_grad(rows.to_dense(), "sparse-only").is_sparse


# -- sparse server steps ------------------------------------------------------------


def sync_run(
    factory: Callable[[nn.Module], torch.optim.Optimizer | list[torch.optim.Optimizer]],
    *,
    workers_sparse: bool,
    reference_sparse: bool,
    steps: int = 4,
) -> tuple[nn.Module, nn.Module, list[dict]]:
    """Sync-sgd over two workers next to one process training on the union batches."""
    server_model = TinyRec(sparse=False)
    reference = TinyRec(sparse=reference_sparse)
    reference.load_state_dict(server_model.state_dict())
    strategy = SyncSGD(server_model, factory)
    ref_opts = factory(reference)
    ref_opts = ref_opts if isinstance(ref_opts, list) else [ref_opts]
    workers = [TinyRec(sparse=workers_sparse, seed=s) for s in (1, 2)]
    sent = []
    for step in range(steps):
        data = [rec_batch(10 * step + i, n) for i, n in enumerate((5, 8))]
        contributions = []
        for i, (worker, d) in enumerate(zip(workers, data, strict=False)):
            start = model_state(server_model)
            load_state(worker, start)
            worker.zero_grad(set_to_none=True)
            loss_of(worker, d).backward()
            contributions.append(
                grad_contribution(worker, start, worker=f"w{i}", batch_size=len(d[3]), version=step)
            )
        sent.append(contributions[0].grads)
        strategy.apply_step(contributions)
        for opt in ref_opts:
            opt.zero_grad()
        loss_of(reference, union(data)).backward()
        for opt in ref_opts:
            opt.step()
    return server_model, reference, sent


def assert_params_close(a: nn.Module, b: nn.Module) -> None:
    sa, sb = model_state(a), model_state(b)
    for name in parameter_names(a):
        assert torch.allclose(sa[name], sb[name], atol=1e-6), (name, (sa[name] - sb[name]).abs().max())


def sgd_factory(weight_decay: float = 0.0):
    return lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=weight_decay)


def adagrad_factory(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(m.parameters(), lr=0.1)


# torch's own Adagrad builds sparse tensors without opting in or out of invariant checks.
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")
@pytest.mark.parametrize("workers_sparse", [True, False])
@pytest.mark.parametrize("factory", [sgd_factory(), adagrad_factory], ids=["sgd-momentum", "adagrad"])
def test_sparse_rows_sync_step_equals_dense_union_training(workers_sparse: bool, factory) -> None:
    """Tables travel as SparseRows whether the worker's embedding is sparse or not, and the
    server step on sparse gradients equals dense training on the union."""
    server_model, reference, sent = sync_run(factory, workers_sparse=workers_sparse, reference_sparse=False)
    assert_params_close(server_model, reference)
    assert all(isinstance(g[name], SparseRows) for g in sent for name in ("table.weight", "bag.weight"))
    assert isinstance(sent[0]["top.weight"], torch.Tensor)
    assert sent[0]["table.weight"].indices.numel() < 40  # only touched rows travelled


def test_weight_decay_densifies_and_still_equals_dense_training() -> None:
    server_model, reference, _ = sync_run(
        sgd_factory(weight_decay=1e-2), workers_sparse=True, reference_sparse=False
    )
    assert_params_close(server_model, reference)


def test_sparse_adam_tables_match_torch_sparse_adam_on_the_union() -> None:
    """Lazy Adam semantics: equal to torch.optim.SparseAdam training on the union batch."""

    def factory(m: nn.Module) -> list[torch.optim.Optimizer]:
        tables = embedding_names(m)
        named = dict(m.named_parameters())
        return [
            torch.optim.SparseAdam([named[n] for n in sorted(tables)], lr=0.05),
            torch.optim.SGD([p for n, p in named.items() if n not in tables], lr=0.1),
        ]

    server_model, reference, _ = sync_run(factory, workers_sparse=True, reference_sparse=True)
    assert_params_close(server_model, reference)
    # Rows never looked up keep their initial values under lazy Adam.
    untouched = torch.arange(12, 40)
    assert torch.equal(server_model.table.weight[untouched], TinyRec(sparse=False).table.weight[untouched])


def test_dense_only_optimizer_gets_densified_rows() -> None:
    factory = lambda m: torch.optim.Adam(m.parameters(), lr=0.01)  # noqa: E731
    server_model, reference, _ = sync_run(factory, workers_sparse=True, reference_sparse=False)
    assert_params_close(server_model, reference)


def test_fedavg_with_sparse_table_deltas_equals_dense_deltas() -> None:
    sparse_server, dense_server = TinyRec(sparse=False), TinyRec(sparse=False)
    sparse_strategy, dense_strategy = FedAvg(sparse_server), FedAvg(dense_server)
    workers = [TinyRec(sparse=True, seed=s) for s in (1, 2)]
    contributions = []
    for i, worker in enumerate(workers):
        start = model_state(sparse_server)
        load_state(worker, start)
        opt = torch.optim.SGD(worker.parameters(), lr=0.1)
        data = rec_batch(i, 6 + i)
        for _ in range(3):
            opt.zero_grad()
            loss_of(worker, data).backward()
            opt.step()
        contributions.append(
            update_contribution(worker, start, worker=f"w{i}", num_examples=6 + i, version=0)
        )
    table_delta = contributions[0].deltas["table.weight"]
    assert isinstance(table_delta, SparseRows) and table_delta.indices.numel() < 12
    sparse_strategy.apply_round(contributions)
    dense_strategy.apply_round(
        [
            UpdateContribution(
                c.worker,
                c.num_examples,
                {n: d.to_dense() if isinstance(d, SparseRows) else d for n, d in c.deltas.items()},
                c.version,
            )
            for c in contributions
        ]
    )
    assert_params_close(sparse_server, dense_server)
    expected = sum((6 + i) / 13 * w.table.weight.detach() for i, w in enumerate(workers))
    assert torch.allclose(sparse_server.table.weight, expected, atol=1e-6)


def test_table_rows_of_the_wrong_shape_are_refused() -> None:
    strategy = SyncSGD(TinyRec(sparse=False))
    bad = SparseRows(torch.tensor([0]), torch.zeros(1, 4), 41)
    with pytest.raises(UsageError, match=r"'table.weight': rows of a torch.float32 \[41, 4\] table"):
        strategy.apply_step([GradContribution("w", 2, {"table.weight": bad}, 0)])
    assert strategy.version == 0
