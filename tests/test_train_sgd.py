"""PlainSGD: torch.optim.SGD's update without importing torch._dynamo (issue 10, bench_floor); no built-in
worker or VFL party imports it (see also test_train_optim.py)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from enclavefl.jobs.demo import DEMO_KEY, SIMULATED_POLICY, write_vfl_demo
from enclavefl.seal.keys import create_key_file
from enclavefl.models import mlp
from enclavefl.train.optim import PlainSGD


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3), (0.0, 1e-2)])
def test_plain_sgd_is_bit_identical_to_torch_sgd(momentum: float, weight_decay: float) -> None:
    torch.manual_seed(0)
    ours = mlp(6, (8, 4), 3)
    reference = copy.deepcopy(ours)
    plain = PlainSGD(ours.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    torch_sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        for model, optimizer in ((ours, plain), (reference, torch_sgd)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sparse_gradients_match_torch_sgd() -> None:
    torch.manual_seed(0)
    ours = torch.nn.Embedding(20, 3, sparse=True)
    reference = copy.deepcopy(ours)
    plain = PlainSGD(ours.parameters(), lr=0.1, momentum=0.9)
    torch_sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        index = torch.tensor([step, step + 3, 7])
        for model, optimizer in ((ours, plain), (reference, torch_sgd)):
            optimizer.zero_grad()
            model(index).pow(2).sum().backward()
            optimizer.step()
    assert torch.equal(ours.weight, reference.weight)


def test_a_worker_round_does_not_import_torch_dynamo() -> None:
    """Building a torch optimizer imports torch._dynamo (seconds): the built-in round must not."""
    code = """
import sys
import torch
from enclavefl.hfl.worker import builtin_trainer
from enclavefl.models import mlp
model = mlp(4, (8,), 1)
data = (torch.randn(32, 4), torch.randint(0, 2, (32,)).float())
trainer = builtin_trainer(model, data, batch_size=8, lr=0.1, momentum=0.9)
trainer.train_one_round({})
assert "torch._dynamo" not in sys.modules, "torch._dynamo was imported"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_sync_sgd_server_step_does_not_import_torch_dynamo() -> None:
    """The gradient strategies' server steps PlainSGD: no torch._dynamo in the server either."""
    code = """
import sys
import torch
from enclavefl.hfl.registry import make_strategy
from enclavefl.hfl.strategies import grad_contribution
from enclavefl.hfl.state import model_state
from enclavefl.models import mlp
model, worker = mlp(4, (8,), 1), mlp(4, (8,), 1)
strategy = make_strategy("sync-sgd", model, lr=0.1, momentum=0.9)
start = model_state(model)
worker(torch.randn(8, 4)).sum().backward()
strategy.apply_step([grad_contribution(worker, start, worker="w", batch_size=8, version=0)])
assert strategy.version == 1
assert "torch._dynamo" not in sys.modules, "torch._dynamo was imported"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# Loaded into every process of a run (PYTHONPATH): notes each start, and who imports torch._dynamo.
_WATCH_DYNAMO = """
import os, sys, traceback
from pathlib import Path
OUT = Path(os.environ["WATCH_DYNAMO_DIR"])
(OUT / f"started-{os.getpid()}").write_text(" ".join(sys.argv))

class _Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch._dynamo":
            (OUT / f"dynamo-{os.getpid()}").write_text(" ".join(sys.argv) + "\\n" + "".join(traceback.format_stack()))
        return None

sys.meta_path.insert(0, _Watch())
"""


def test_vfl_parties_do_not_import_torch_dynamo(tmp_path: Path) -> None:
    """The built-in VFL optimizers (adam here) train without torch.optim: neither the leader
    nor the follower imports torch._dynamo (seconds of CPU in each)."""
    (tmp_path / "policy.json").write_text(json.dumps(SIMULATED_POLICY))
    create_key_file(tmp_path / DEMO_KEY)
    job_file = write_vfl_demo(tmp_path)
    job = yaml.safe_load(job_file.read_text())
    assert job["training"]["optimizer"] == "adam"
    job["training"]["epochs"] = 1
    job_file.write_text(yaml.safe_dump(job))
    watch = tmp_path / "watch"
    watch.mkdir()
    (watch / "sitecustomize.py").write_text(_WATCH_DYNAMO)
    env = {**os.environ, "PYTHONPATH": str(watch), "WATCH_DYNAMO_DIR": str(watch)}
    done = subprocess.run([sys.executable, "-m", "enclavefl", "run", str(job_file)], capture_output=True, text=True,
                          timeout=240, check=False, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    started = [p.read_text() for p in watch.glob("started-*")]
    assert sum(" party " in f" {argv} " for argv in started) == 2, started  # the watch ran in both parties
    imported = [p.read_text() for p in watch.glob("dynamo-*")]
    assert not imported, imported[0][-3000:]


def test_a_party_does_not_import_sklearn_or_scipy() -> None:
    """scikit-learn pulls scipy.stats: seconds on every party's start for one AUC function."""
    code = """
import sys
import enclavefl.jobs.party, enclavefl.jobs.hfl_job, enclavefl.jobs.vfl_job, enclavefl.train.metrics
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"sklearn", "scipy", "torch._dynamo", "matplotlib"})
assert not heavy and "torch._dynamo" not in sys.modules, heavy
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_binary_auc_equals_the_mann_whitney_statistic_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    from enclavefl.train.metrics import binary_auc

    g = torch.Generator().manual_seed(3)
    for rows in (7, 300, 5000):
        labels = torch.randint(0, 2, (rows,), generator=g)
        scores = torch.round((torch.randn(rows, generator=g) + labels) * 4) / 4  # many ties
        assert binary_auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


def test_python_m_enclavefl_keeps_exit_codes() -> None:
    ok = subprocess.run([sys.executable, "-m", "enclavefl", "--help"], capture_output=True, text=True, timeout=60,
                        check=False)
    assert ok.returncode == 0 and "Usage" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "enclavefl", "party", "/nonexistent/job.yaml", "--name", "x"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "cannot read job file" in bad.stderr
