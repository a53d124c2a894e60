"""data: {kind: python, factory: module:function}: rows made by the user's code, resolved like any job reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from enclavefl.errors import ConfigError, UsageError
from enclavefl.jobs.config import HflJobConfig, load_job
from enclavefl.jobs.datasets import load_party_data

POLICY = Path(__file__).resolve().parents[1] / "examples" / "policy-sim.json"


def job(tmp_path: Path, factory: str, args: dict) -> HflJobConfig:
    spec = {
        "job": {"name": "python-data", "mode": "hfl"},
        "parties": [
            {"name": "server", "role": "server", "address": "127.0.0.1:1"},
            {"name": "w", "role": "worker", "data": {"kind": "python", "factory": factory, "args": args}},
        ],
        "tee": {"attester": "simulated", "allow_simulated_insecure": True},
        "policy": str(POLICY),
        "model": {"name": "mlp", "args": {"in_features": 3, "hidden": [4], "out_features": 1}},
        "strategy": {"name": "fedavg", "rounds": 1, "batch_size": 4, "lr": 0.1},
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))
    config = load_job(path)
    assert isinstance(config, HflJobConfig)
    return config


def test_a_factory_beside_the_job_file_makes_the_rows(tmp_path: Path) -> None:
    (tmp_path / "my_rows.py").write_text(
        "import numpy as np\n"
        "def load(n):\n"
        "    x = np.arange(3 * n, dtype=np.float64).reshape(n, 3)\n"
        "    return x, (x[:, 0] > 3).astype(np.int64)\n"
        "def dataset(n):\n"
        "    return [(np.ones(3) * i, i % 2) for i in range(n)]\n"
    )
    config = job(tmp_path, "my_rows:load", {"n": 5})
    data = load_party_data(config.party("w").data, seed=0, code=config.job_code())
    assert data.inputs[0].dtype == np.float32 and data.inputs[0].shape == (5, 3)
    assert data.labels is not None and data.labels.tolist() == [0, 0, 1, 1, 1] and len(data) == 5
    config = job(tmp_path, "my_rows:dataset", {"n": 4})
    data = load_party_data(config.party("w").data, seed=0, code=config.job_code())
    assert data.inputs[0].shape == (4, 3) and data.labels is not None and data.labels.tolist() == [0, 1, 0, 1]


def test_bad_factories_are_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "bad_rows.py").write_text(
        "import numpy as np\n"
        "def one():\n    return np.zeros(3)\n"
        "def ragged():\n    return np.zeros((3, 2)), np.zeros(4)\n"
    )
    for factory, message in [("bad_rows:one", "expected \\(inputs..., labels\\) arrays"),
                             ("bad_rows:ragged", "same number of rows")]:  # fmt: skip
        config = job(tmp_path, factory, {})
        with pytest.raises(UsageError, match=message):
            load_party_data(config.party("w").data, seed=0, code=config.job_code())
    with pytest.raises(ConfigError, match="os:system"):
        config = job(tmp_path, "os:system", {})
        load_party_data(config.party("w").data, seed=0, code=config.job_code())
