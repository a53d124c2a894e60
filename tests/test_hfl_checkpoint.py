"""Sealed hfl checkpoints: round trip, keep_last, and every way a file can be wrong."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from enclavefl.errors import SealError, UsageError
from enclavefl.hfl.checkpoint import CheckpointStore, rng_state, set_rng_state
from enclavefl.seal.keys import FileKeySource, create_key_file

JOB = "ckpt-job"


def state(version: int) -> dict[str, object]:
    return {
        "version": version,
        "weights": torch.full((3, 2), float(version)),
        "momentum": torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,), check_invariants=True),
        "history": [{"version": version, "auc": 0.5, "missing": None}],
    }


def store(tmp_path: Path, key: FileKeySource, **kwargs: object) -> CheckpointStore:
    return CheckpointStore(tmp_path / "ckpt", key=key, job_id=JOB, **kwargs)  # type: ignore[arg-type]


def test_round_trip_keeps_the_newest_and_never_leaves_plaintext(tmp_path: Path, key: FileKeySource) -> None:
    checkpoints = store(tmp_path, key, keep_last=2)
    assert checkpoints.load_latest() is None
    for version in (1, 2, 3):
        checkpoints.save(version, state(version))
    assert checkpoints.versions() == [2, 3]
    version, loaded = checkpoints.load_latest()  # type: ignore[misc]
    assert version == 3
    assert torch.equal(loaded["weights"], torch.full((3, 2), 3.0))
    assert torch.equal(loaded["momentum"].to_dense(), torch.tensor([1.0, 0.0, 2.0, 0.0]))
    assert loaded["history"] == [{"version": 3, "auc": 0.5, "missing": None}]
    raw = checkpoints.path(3).read_bytes()
    assert torch.full((3, 2), 3.0).numpy().tobytes() not in raw
    assert sorted(p.name for p in checkpoints.directory.iterdir()) == [
        "hfl-server-checkpoint-v0000000002.sealed",
        "hfl-server-checkpoint-v0000000003.sealed",
    ]
    assert oct(checkpoints.directory.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_newest_checkpoint_is_refused_not_skipped(
    tmp_path: Path, key: FileKeySource, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoints = store(tmp_path, key)
    checkpoints.save(1, state(1))
    checkpoints.save(2, state(2))
    path = checkpoints.path(2)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x80
    else:
        del data[-100:]
    path.write_bytes(bytes(data))
    with pytest.raises(SealError) as refused:
        checkpoints.load_latest()
    assert refused.value.check == "integrity"
    assert "not falling back" in caplog.text
    assert checkpoints.load(1)["version"] == 1  # the older one is intact, for the operator


def test_a_file_renamed_to_a_newer_version_is_refused(tmp_path: Path, key: FileKeySource) -> None:
    checkpoints = store(tmp_path, key)
    checkpoints.save(4, state(4))
    os.replace(checkpoints.path(4), checkpoints.path(9))
    with pytest.raises(SealError) as refused:
        checkpoints.load_latest()
    assert refused.value.check == "version"


def test_another_job_artifact_or_key_is_refused(tmp_path: Path, key: FileKeySource) -> None:
    checkpoints = store(tmp_path, key)
    checkpoints.save(1, state(1))
    other_job = CheckpointStore(checkpoints.directory, key=key, job_id="other-job")
    with pytest.raises(SealError) as refused:
        other_job.load(1)
    assert refused.value.check == "job-id"
    os.replace(checkpoints.path(1), checkpoints.directory / "worker-v0000000001.sealed")
    worker = CheckpointStore(checkpoints.directory, key=key, job_id=JOB, artifact="worker")
    with pytest.raises(SealError) as refused:
        worker.load(1)
    assert refused.value.check == "artifact"
    wrong_key = CheckpointStore(checkpoints.directory, key=create_key_file(tmp_path / "other.key"), job_id=JOB,
                                artifact="worker")  # fmt: skip
    with pytest.raises(SealError) as refused:
        wrong_key.load(1)
    assert refused.value.check in ("key", "artifact")


def test_bad_settings_are_usage_errors(tmp_path: Path, key: FileKeySource) -> None:
    with pytest.raises(UsageError, match="keep_last"):
        store(tmp_path, key, keep_last=0)
    with pytest.raises(UsageError, match="artifact name"):
        store(tmp_path, key, artifact="../escape")


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path, key: FileKeySource) -> None:
    checkpoints = store(tmp_path, key)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    captured = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoints.save(1, {"rng": captured})
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(checkpoints.load(1)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def _torch_zip_with(member: bytes) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", member)
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "plaintext",
    [
        b"",
        b"not a torch file at all",
        b"\x80\x04K\x01.",  # a pickle of 1: not a dict
        b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93.",  # os.system: refused
        b"\x80\x04}\x94(\x8c\x01a",  # a pickle cut short
        b"PK\x03\x04" + os.urandom(64),  # a zip header, then garbage
        _torch_zip_with(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01Q."),  # a persistent id it cannot resolve
        _torch_zip_with(b"garbage"),
        os.urandom(512),
    ],
    ids=["empty", "text", "int", "global", "truncated", "zip-garbage", "persistent-id", "zip-member", "random"],
)
def test_an_authentic_file_that_is_not_a_checkpoint_is_a_format_error(
    tmp_path: Path, key: FileKeySource, plaintext: bytes
) -> None:
    """It decrypts (the key and the binding are right) but is not a torch checkpoint: a
    typed FormatError, never pickle's or zipfile's own exceptions (issue 12, item 10)."""
    from enclavefl.errors import FormatError
    from enclavefl.seal.sealed import write_sealed

    checkpoints = store(tmp_path, key)
    with write_sealed(checkpoints.path(4), key=key, job_id=checkpoints.job_id, name=checkpoints.artifact,
                      version=4) as stream:
        stream.write(plaintext)
    with pytest.raises(FormatError, match="authentic but not a loadable checkpoint|must hold a dict"):
        checkpoints.load_latest()
