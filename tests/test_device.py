"""device: auto | cpu | cuda | cuda:N, resolved the same way by every role."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from enclavefl.errors import ConfigError
from enclavefl.train.device import resolve_device

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_cpu_and_auto_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_auto_picks_the_first_gpu_when_torch_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"torch sees 2 GPU\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_cuda_without_a_gpu_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="requested but torch sees no GPU") as caught:
            resolve_device(spec)
        assert caught.value.exit_code == 2


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1", ""])
def test_malformed_device_is_refused(spec: str) -> None:
    with pytest.raises(ConfigError, match="is not one of auto, cpu, cuda, cuda:N"):
        resolve_device(spec)


@pytest.mark.integration  # end to end (parties over gRPC, or subprocesses): `make test`, not `make test-unit`
def test_a_party_asking_for_cuda_without_a_gpu_exits_2_before_attesting(tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLES))
    import api_custom_strategy

    spec = api_custom_strategy.job_file(tmp_path, rounds=1, port=api_custom_strategy.free_port(), max_norm=1.0)
    spec["parties"][1]["device"] = "cuda"
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(EXAMPLES)}
    done = subprocess.run([sys.executable, "-m", "enclavefl", "party", str(job), "--name", "worker-0",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300,
                          check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "device 'cuda' requested but torch sees no GPU" in done.stderr
    assert "Traceback" not in done.stderr
    assert "simulated attestation" not in done.stderr  # refused before it attested
