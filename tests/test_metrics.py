"""Metrics from logits against sklearn, and federated aggregation of their statistics."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavefl.errors import UsageError
from enclavefl.train.metrics import (
    AUC_BINS,
    EvalStats,
    accuracy,
    aggregate_stats,
    binary_auc,
    eval_stats,
    compute_metrics,
    histogram_auc,
    log_loss,
    macro_f1,
)


def skm() -> Any:
    """sklearn.metrics, imported by the tests that compare with it, not at collection (~1 s)."""
    from sklearn import metrics

    return metrics


def binary_data(n: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    logits = scale * torch.randn(n, generator=g) + 1.2 * (labels.float() - 0.5)
    return logits, labels


def multiclass_data(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), labels] += 0.8
    return logits, labels


def test_accuracy_matches_sklearn() -> None:
    logits, labels = multiclass_data(500, 5, seed=0)
    assert accuracy(logits, labels) == pytest.approx(skm().accuracy_score(labels, logits.argmax(1)))
    b_logits, b_labels = binary_data(500, seed=1)
    expected = skm().accuracy_score(b_labels, torch.sigmoid(b_logits) > 0.5)
    assert accuracy(b_logits, b_labels) == pytest.approx(expected)
    assert accuracy(b_logits.unsqueeze(1), b_labels.float()) == pytest.approx(expected)


def test_log_loss_matches_sklearn() -> None:
    logits, labels = multiclass_data(400, 4, seed=2)
    expected = skm().log_loss(labels, torch.softmax(logits.double(), 1).numpy(), labels=range(4))
    assert log_loss(logits, labels) == pytest.approx(expected, rel=1e-9)
    b_logits, b_labels = binary_data(400, seed=3)
    expected = skm().log_loss(b_labels, torch.sigmoid(b_logits.double()).numpy())
    assert log_loss(b_logits, b_labels) == pytest.approx(expected, rel=1e-9)


def test_log_loss_is_stable_for_extreme_logits() -> None:
    # sigmoid(100) rounds to 1.0 in float32, so a loss computed from probabilities is inf.
    assert log_loss(torch.tensor([100.0, -100.0]), torch.tensor([0, 1])) == pytest.approx(100.0)
    assert log_loss(torch.tensor([[1000.0, 0.0]]), torch.tensor([1])) == pytest.approx(1000.0)
    assert log_loss(torch.tensor([100.0]), torch.tensor([1])) == pytest.approx(math.exp(-100.0), rel=1e-6)


def test_binary_auc_matches_sklearn_and_is_nan_for_one_class() -> None:
    logits, labels = binary_data(300, seed=4)
    assert binary_auc(logits, labels) == pytest.approx(skm().roc_auc_score(labels, logits))
    assert math.isnan(binary_auc(logits, torch.zeros(300, dtype=torch.int64)))
    assert math.isnan(binary_auc(logits, torch.ones(300)))
    with pytest.raises(UsageError, match="binary_auc needs binary logits"):
        binary_auc(torch.zeros(3, 2), torch.tensor([0, 1, 0]))


@pytest.mark.parametrize(("scale", "bound"), [(2.0, 1e-3), (0.05, 0.02), (30.0, 0.2)])
def test_histogram_auc_is_within_its_reported_bound_of_sklearn(scale: float, bound: float) -> None:
    """Spread logits give a tiny bound; very narrow ones share bins and very wide ones are
    clamped at the ends, which widens the bound, and it still holds."""
    logits, labels = binary_data(20000, seed=5, scale=scale)
    summary = eval_stats(logits, labels).summary()
    exact = skm().roc_auc_score(labels.numpy(), logits.double().numpy())
    assert abs(summary["auc"] - exact) <= summary["auc_max_error"] + 1e-12
    assert summary["auc_max_error"] < bound


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.floats(-20, 20, allow_nan=False), st.booleans()),
        min_size=2,
        max_size=60,
    ).filter(lambda rows: 0 < sum(r[1] for r in rows) < len(rows)),
    st.integers(2, 64),
)
def test_histogram_auc_bound_holds_for_any_data(rows: list[tuple[float, bool]], bins: int) -> None:
    logits = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    labels = torch.tensor([int(r[1]) for r in rows])
    summary = eval_stats(logits, labels, auc_bins=bins).summary()
    assert (
        abs(summary["auc"] - skm().roc_auc_score(labels.numpy(), logits.numpy()))
        <= summary["auc_max_error"] + 1e-12
    )


def test_histogram_auc_of_one_class_is_nan() -> None:
    auc, err = histogram_auc(torch.tensor([0, 3, 1]), torch.zeros(3, dtype=torch.int64))
    assert math.isnan(auc) and math.isnan(err)
    stats = eval_stats(torch.tensor([0.3, -2.0]), torch.tensor([1, 1]))
    assert math.isnan(stats.summary()["auc"])


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_aggregated_shards_equal_the_whole(task: str) -> None:
    logits, labels = binary_data(3001, seed=6) if task == "binary" else multiclass_data(3001, 7, seed=6)
    cuts = [0, 400, 1900, 3001]
    shards = [eval_stats(logits[a:b], labels[a:b]) for a, b in itertools.pairwise(cuts)]
    # Each party's statistics cross the wire as named tensors.
    total = aggregate_stats([EvalStats.from_tensors(s.to_tensors()) for s in shards])
    whole = eval_stats(logits, labels)
    assert (
        (total.count, total.correct)
        == (whole.count, whole.correct)
        == (3001, round(accuracy(logits, labels) * 3001))
    )
    assert total.loss_sum == pytest.approx(whole.loss_sum, rel=1e-12)
    assert total.summary()["log_loss"] == pytest.approx(log_loss(logits, labels), rel=1e-12)
    if task == "binary":
        assert torch.equal(total.auc_positive, whole.auc_positive)
        assert torch.equal(total.auc_negative, whole.auc_negative)
        assert total.auc_positive.shape == (AUC_BINS,)
        assert abs(total.summary()["auc"] - binary_auc(logits, labels)) < 1e-3
    else:
        assert total.auc_positive is None and "auc" not in total.summary()


def test_statistics_that_cannot_be_added_or_parsed_are_refused() -> None:
    binary = eval_stats(*binary_data(10, seed=7))
    multi = eval_stats(*multiclass_data(10, 3, seed=7))
    with pytest.raises(UsageError, match="binary-task EvalStats"):
        aggregate_stats([binary, multi])
    with pytest.raises(UsageError, match="8192 and 16 AUC bins"):
        binary + eval_stats(*binary_data(10, seed=8), auc_bins=16)
    with pytest.raises(UsageError, match="zero parties"):
        aggregate_stats([])
    wire = binary.to_tensors()
    with pytest.raises(UsageError, match=r"missing \['count'\]"):
        EvalStats.from_tensors({k: v for k, v in wire.items() if k != "count"})
    with pytest.raises(UsageError, match="histograms count 10 examples, not 11"):
        EvalStats.from_tensors({**wire, "count": torch.tensor([11])})
    with pytest.raises(UsageError, match="'loss_sum' must be torch.float64"):
        EvalStats.from_tensors({**wire, "loss_sum": torch.tensor([1.0])})
    with pytest.raises(UsageError, match="correct <= count"):
        EvalStats(3, 4, 1.0)


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.tensor([0.1, 0.2]), torch.tensor([0, 2]), "binary labels must be 0 or 1"),
        (torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), "1 NaN or infinite"),
        (torch.zeros(3, 4), torch.tensor([0, 1, 4]), r"must lie in \[0, 4\)"),
        (torch.zeros(3, 4), torch.tensor([0.0, 1.0, 2.0]), "must be integers"),
        (torch.zeros(3), torch.tensor([0, 1]), "expected logits"),
        (torch.zeros(0), torch.zeros(0), "zero examples"),
        (torch.tensor([1, 2]), torch.tensor([0, 1]), "floating point"),
    ],
)
def test_bad_inputs_are_refused(logits: torch.Tensor, labels: torch.Tensor, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        eval_stats(logits, labels)


def test_eval_stats_rejects_a_bad_bin_count() -> None:
    with pytest.raises(UsageError, match="auc_bins must be an int >= 2"):
        eval_stats(*binary_data(5, seed=9), auc_bins=1)
    assert eval_stats(*binary_data(5, seed=9), auc_bins=None).auc_positive is None
    assert np.isfinite(eval_stats(*binary_data(5, seed=9)).loss_sum)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_macro_f1_matches_sklearn_and_aggregates_exactly(task: str) -> None:
    logits, labels = binary_data(2001, seed=10) if task == "binary" else multiclass_data(2001, 6, seed=10)
    predicted = (logits > 0).long() if task == "binary" else logits.argmax(1)
    expected = skm().f1_score(labels.numpy(), predicted.numpy(), average="macro")
    assert macro_f1(logits, labels) == pytest.approx(expected, rel=1e-12)
    shards = [eval_stats(logits[a:b], labels[a:b]) for a, b in itertools.pairwise([0, 700, 2001])]
    total = aggregate_stats([EvalStats.from_tensors(s.to_tensors()) for s in shards])
    assert total.summary()["macro_f1"] == pytest.approx(expected, rel=1e-12)


def test_regression_statistics_aggregate_to_sklearn_metrics() -> None:
    g = torch.Generator().manual_seed(11)
    labels = 150 + 70 * torch.randn(901, generator=g, dtype=torch.float64)
    predictions = (labels + 40 * torch.randn(901, generator=g, dtype=torch.float64)).float().unsqueeze(1)
    shards = [
        eval_stats(predictions[a:b], labels[a:b], task="regression")
        for a, b in itertools.pairwise([0, 100, 555, 901])
    ]
    total = aggregate_stats([EvalStats.from_tensors(s.to_tensors()) for s in shards])
    summary = total.summary()
    y, p = labels.numpy(), predictions[:, 0].double().numpy()
    assert summary["r2"] == pytest.approx(skm().r2_score(y, p), rel=1e-9)
    assert summary["rmse"] == pytest.approx(math.sqrt(skm().mean_squared_error(y, p)), rel=1e-9)
    assert summary["mae"] == pytest.approx(skm().mean_absolute_error(y, p), rel=1e-9)
    assert "accuracy" not in summary and "log_loss" not in summary
    assert compute_metrics(predictions, labels, task="regression")["r2"] == pytest.approx(summary["r2"], rel=1e-9)
    with pytest.raises(UsageError, match="regression EvalStats to classification"):
        shards[0] + eval_stats(*binary_data(10, seed=12), auc_bins=None)


def test_user_metrics_pool_as_the_example_weighted_mean() -> None:
    logits, labels = binary_data(300, seed=13)

    def positives(outputs: torch.Tensor, truth: torch.Tensor) -> float:
        return float((outputs > 0).double().mean())

    metric = {"positives": positives}
    shards = [eval_stats(logits[a:b], labels[a:b], user_metrics=metric) for a, b in [(0, 100), (100, 300)]]
    total = aggregate_stats([EvalStats.from_tensors(s.to_tensors()) for s in shards])
    assert total.summary()["positives"] == pytest.approx(float((logits > 0).double().mean()), rel=1e-12)
    with pytest.raises(UsageError, match="user metric 'bad' returned nan"):
        eval_stats(logits, labels, user_metrics={"bad": lambda o, t: math.nan})


@pytest.mark.parametrize(
    ("logits", "labels", "task", "message"),
    [
        (torch.zeros(3, 2), torch.tensor([0.5, 1.0, 2.0]), "regression", "one output per example"),
        (torch.zeros(3), torch.tensor([0, 1, 2]), "multiclass", r"needs outputs \[n, C\]"),
        (torch.zeros(2), torch.tensor([1.0, float("inf")]), "regression", "finite numbers"),
    ],
)
def test_outputs_that_do_not_fit_the_task_are_refused(
    logits: torch.Tensor, labels: torch.Tensor, task: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        eval_stats(logits, labels, task=task)  # type: ignore[arg-type]
