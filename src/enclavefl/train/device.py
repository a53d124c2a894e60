"""Where a party computes: `auto`, `cpu`, `cuda` or `cuda:N`, checked against what torch sees.

One function for every role (hfl server and workers, vfl leader and followers), so a job
that asks for a GPU the machine does not have stops with the same clear error everywhere,
before it attests or connects, instead of failing inside the first forward pass.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from enclavefl.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_PATTERN", "resolve_device"]

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
"""What a job file's `device:` accepts."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for `spec`; `auto` (or None) is the first GPU when torch sees one, else the CPU.

    Raises ConfigError (exit 2) for a malformed spec, for `cuda` when torch sees no GPU
    (a CPU-only build or no driver), and for `cuda:N` beyond the GPUs it sees.
    """
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip()
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise ConfigError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if text == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if text == "auto":
        return torch.device("cuda", 0) if available else torch.device("cpu")
    if not available:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU or driver"
        raise ConfigError(
            f"device {text!r} requested but torch sees no GPU (torch {torch.__version__}, {build}); "
            "use device: cpu or auto, or install a CUDA build of torch on a machine with a GPU"
        )
    index = int(text.split(":", 1)[1]) if ":" in text else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device {text!r} requested but torch sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)
