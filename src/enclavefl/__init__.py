"""enclavefl: confidential federated learning between mutually attested TEEs.

The user API, loaded on first use so that `import enclavefl` (and `enclavefl verify`)
imports neither torch nor the network stack:

* training: `Trainer`, `GradientTrainer`, `FitResult`, `EvalResult`, `GradResult`, `Rows`,
  `TorchTrainer` (extra `[ml]`), `KerasTrainer` (extra `[tf]`), `resolve_device`;
* strategies: `Strategy` (the contract), `Contribution`, `make_strategy`, the built-ins
  `FedAvg`, `FedProx`, `FedAdam`, `SyncSGD`, `AsyncSGD`, `CoordinateMedian`, `TrimmedMean`;
* running: `run_worker(trainer, job=..., party=...)`, `serve(strategy, job=..., party=...)`,
  and for vertical jobs `lead(job=..., model=...)`, `follow(job=..., party=..., model=...)`;
* errors: `EnclaveflError`, `UsageError`, `ConfigError`, `Rejected`, `TransportError`, `JobFailed`.

What must never be used unknowingly (simulated attestation, `file:` keys, one-way
attestation) lives in `enclavefl.insecure`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from enclavefl.lazy import lazy_exports

try:
    # One source of truth: the version pyproject.toml gives the installed distribution.
    __version__ = version("enclavefl")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    # training (enclavefl.train: numpy only, torch for TorchTrainer)
    "Trainer": "enclavefl.train.contract",
    "GradientTrainer": "enclavefl.train.contract",
    "FitResult": "enclavefl.train.contract",
    "EvalResult": "enclavefl.train.contract",
    "GradResult": "enclavefl.train.contract",
    "Rows": "enclavefl.train.contract",
    "TorchTrainer": "enclavefl.train.torch",
    "KerasTrainer": "enclavefl.train.keras",
    "resolve_device": "enclavefl.train.device",
    # strategies
    "Strategy": "enclavefl.hfl.contract",
    "Contribution": "enclavefl.hfl.contract",
    "make_strategy": "enclavefl.hfl.registry",
    "FedAvg": "enclavefl.hfl.strategies",
    "FedProx": "enclavefl.hfl.strategies",
    "FedAdam": "enclavefl.hfl.strategies",
    "SyncSGD": "enclavefl.hfl.strategies",
    "AsyncSGD": "enclavefl.hfl.strategies",
    "CoordinateMedian": "enclavefl.hfl.robust",
    "TrimmedMean": "enclavefl.hfl.robust",
    # running a party
    "run_worker": "enclavefl.jobs.api",
    "serve": "enclavefl.jobs.api",
    "lead": "enclavefl.jobs.vfl_api",
    "follow": "enclavefl.jobs.vfl_api",
    # errors
    "EnclaveflError": "enclavefl.errors",
    "UsageError": "enclavefl.errors",
    "ConfigError": "enclavefl.errors",
    "Rejected": "enclavefl.errors",
    "TransportError": "enclavefl.errors",
    "JobFailed": "enclavefl.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
