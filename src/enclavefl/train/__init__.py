"""User training code: the fit/evaluate contract and its framework adapters.

A leaf package: it knows nothing of the network, the TEE or the parameter server.
Metrics (`train.metrics`) and losses (`train.losses`) live here so that horizontal
workers, the parameter server and the vertical leader share one implementation.
"""

from enclavefl.train.contract import Config, EvalResult, FitResult, GradientTrainer, GradResult, Trainer, Weights
from enclavefl.train.device import resolve_device

__all__ = ["Config", "EvalResult", "FitResult", "GradResult", "GradientTrainer", "Trainer", "Weights", "resolve_device"]
