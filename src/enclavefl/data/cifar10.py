"""CIFAR-10 in its python pickle format (data_batch_1..5, test_batch, batches.meta).

Images are returned as uint8 NCHW [N, 3, 32, 32] (the channel-major order the files
store), labels as int64 [N]. The pickles are read with an unpickler that only admits the
numpy types an array needs, so a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import http.client
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from enclavefl.errors import FormatError, UsageError

__all__ = [
    "CIFAR10_DIR",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "CLASSES",
    "MEAN",
    "STD",
    "TEST_FILES",
    "TRAIN_FILES",
    "DownloadProgress",
    "augment",
    "download_cifar10",
    "load_cifar10",
    "load_label_names",
    "normalize",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

DownloadProgress = Callable[[int, int | None], None]
"""Called as (bytes received so far, total bytes or None) while the archive downloads."""

_IMAGE_VALUES = 3 * 32 * 32
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 spell bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            # latin1 is how Python 2 pickles of numpy arrays (the published files) decode.
            raw = _ArrayUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise UsageError(
            f"CIFAR-10 file {path} not found: run download_cifar10() or "
            f"download {CIFAR10_URL}, extract it and pass the folder"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise FormatError(f"{path} is not a CIFAR-10 python batch: {exc}") from None
    if not isinstance(raw, Mapping):
        raise FormatError(f"{path} is not a CIFAR-10 python batch: top level is {type(raw).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _batch_dir(root: Path) -> Path:
    root = Path(root)
    nested = root / CIFAR10_DIR
    return nested if nested.is_dir() else root


def load_cifar10(root: str | Path, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 NCHW [N, 3, 32, 32] and labels int64 [N] of the train or test split.

    `root` is the extracted `cifar-10-batches-py` folder or the folder that contains it.
    """
    folder = _batch_dir(Path(root))
    images, labels = [], []
    for name in TRAIN_FILES if train else TEST_FILES:
        path = folder / name
        batch = _read_batch(path)
        if "data" not in batch or "labels" not in batch:
            raise FormatError(f"{path}: missing key 'data' or 'labels' (keys: {sorted(batch)})")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_VALUES:
            raise FormatError(
                f"{path}: 'data' must be uint8 [N, {_IMAGE_VALUES}], got {data.dtype} {list(data.shape)}"
            )
        label = np.asarray(batch["labels"], dtype=np.int64)
        if label.shape != (data.shape[0],):
            raise FormatError(f"{path}: {data.shape[0]} images but {label.size} labels")
        if label.size and (label.min() < 0 or label.max() >= len(CLASSES)):
            raise FormatError(f"{path}: labels must be in 0..9, found {label.min()}..{label.max()}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(label)
    return np.concatenate(images), np.concatenate(labels)


def load_label_names(root: str | Path) -> list[str]:
    """Class names from batches.meta."""
    path = _batch_dir(Path(root)) / "batches.meta"
    meta = _read_batch(path)
    names = meta.get("label_names")
    if not isinstance(names, list):
        raise FormatError(f"{path}: missing list 'label_names'")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images -> float32 tensor standardized with the CIFAR-10 channel mean/std."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise UsageError(f"expected uint8 images [N, 3, H, W], got {x.dtype} {list(x.shape)}")
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR training augmentation: 4-pixel padded random crop, random h-flip."""
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(height)).view(n, 1, height, 1)
    cols = (dx.view(n, 1) + torch.arange(width)).view(n, 1, 1, width)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channel = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    out = padded[batch, channel, rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def download_cifar10(
    root: str | Path,
    *,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    on_progress: DownloadProgress | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download, MD5-check and safely extract CIFAR-10 under `root`; returns the batch folder.

    `on_progress(done, total)` is called after every chunk with the bytes received and the
    announced size (None when the server sends none): the caller draws the bar, data/ stays
    free of any terminal code. Does nothing when the batches are already there. Without network it raises a
    UsageError that tells the user to fetch the archive by hand and pass its folder.
    """
    root = Path(root)
    target = root / CIFAR10_DIR
    if all((target / name).is_file() for name in (*TRAIN_FILES, *TEST_FILES)):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=root, prefix=".cifar10-", suffix=".tar.gz") as archive:
        digest = _fetch(url, archive, timeout_s=timeout_s, on_progress=on_progress)
        if digest != md5:
            raise FormatError(f"CIFAR-10 archive from {url}: MD5 mismatch: got {digest}, expected {md5}")
        archive.flush()
        _extract(Path(archive.name), root)
    if not target.is_dir():
        raise FormatError(f"CIFAR-10 archive from {url} has no {CIFAR10_DIR}/ folder")
    return target


def _fetch(url: str, out: Any, *, timeout_s: float, on_progress: DownloadProgress | None) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            done = 0
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done, total)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise UsageError(
            f"cannot download CIFAR-10 from {url} ({getattr(exc, 'reason', exc)}): download "
            f"it on a machine with network access, extract it, and pass the folder that holds "
            f"{CIFAR10_DIR}/"
        ) from None
    return md5.hexdigest()


def _extract(archive: Path, root: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                top = Path(member.name).parts[0] if member.name else ""
                if top != CIFAR10_DIR:
                    raise FormatError(f"CIFAR-10 archive member {member.name!r} is outside {CIFAR10_DIR}/")
                # The "data" filter refuses absolute paths, '..', links out and device
                # files; checking every member first means a bad archive writes nothing.
                tarfile.data_filter(member, str(root))
            tar.extractall(root, filter="data")
    except (tarfile.TarError, EOFError) as exc:
        raise FormatError(f"cannot extract CIFAR-10 archive: {exc}") from None
