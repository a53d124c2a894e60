"""The parameter server's parts on their own: settings checks and evaluation pooling."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from enclavefl.errors import UsageError
from enclavefl.hfl.evaluation import EvalPool, Reported, parse_report, pool
from enclavefl.hfl.settings import ServerSettings
from enclavefl.net.tensors import Message
from enclavefl.train.metrics import eval_stats

GOOD: dict[str, Any] = dict(
    workers=["a", "b"], total=3, min_workers=None, round_timeout_s=5.0, quorum_timeout_s=None, eval_every=1,
    checkpoint_every=1, max_pending_uploads=1, max_pending_downloads=2, upload_lease_s=60.0, poll_s=1.0,
)


def test_settings_defaults_and_refusals() -> None:
    settings = ServerSettings.check(**GOOD)
    assert settings.min_workers == 2 and settings.quorum_timeout_s == 50.0 and settings.workers == ("a", "b")
    for change, message in [
        ({"workers": []}, "at least one worker"),
        ({"total": 0}, "total must be an int >= 1"),
        ({"min_workers": 3}, r"min_workers must be an int in \[1, 2\]"),
        ({"round_timeout_s": 0}, "round_timeout_s must be > 0"),
        ({"quorum_timeout_s": -1.0}, "quorum_timeout_s must be > 0"),
        ({"max_pending_uploads": True}, "max_pending_uploads must be an int >= 1"),
    ]:
        with pytest.raises(UsageError, match=message):
            ServerSettings.check(**{**GOOD, **change})


def test_pool_adds_statistics_exactly_and_weights_plain_reports_by_examples() -> None:
    a = eval_stats(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0]))
    b = eval_stats(torch.tensor([-3.0]), torch.tensor([1.0]))
    pooled, count = pool([a, b])
    assert count == 4 and pooled["accuracy"] == pytest.approx(2 / 4)
    mixed, count = pool([Reported(30, 0.5, {"accuracy": 0.9}), Reported(10, 1.0, {"accuracy": 0.5})])
    assert count == 40 and mixed["accuracy"] == pytest.approx(0.8) and mixed["loss"] == pytest.approx(0.625)


def test_eval_pool_settles_when_every_expected_worker_reported_or_left() -> None:
    evals = EvalPool(timeout_s=10.0)
    evals.open(2, {"a", "b"}, now=0.0)
    assert evals.report("a", 2, Reported(10, 0.3, {"accuracy": 1.0}))
    assert not evals.report("a", 2, Reported(10, 0.3, {"accuracy": 1.0}))  # a second report is ignored
    assert not evals.report("a", 7, Reported(10, 0.3, {}))  # nobody waits for version 7
    assert evals.settle(1.0, live={"a", "b"}) == [] and evals.waiting
    [record] = evals.settle(1.0, live={"a"})  # b left the live set
    assert record["version"] == 2 and record["parties"] == 1 and record["accuracy"] == 1.0
    assert not evals.waiting
    evals.open(3, {"a"}, now=0.0)
    assert evals.settle(11.0, live={"a"}) == [] and not evals.waiting  # timed out with no report


def test_parse_report_checks_plain_reports() -> None:
    assert parse_report(Message({"examples": 5, "loss": 0.1, "metrics": {"r2": 0.5}})) == Reported(5, 0.1, {"r2": 0.5})
    with pytest.raises(UsageError, match="loss must be a finite number"):
        parse_report(Message({"examples": 5, "loss": float("nan"), "metrics": {}}))
    with pytest.raises(UsageError, match="metrics must map names to finite numbers"):
        parse_report(Message({"examples": 5, "loss": 0.1, "metrics": {"r2": "high"}}))
