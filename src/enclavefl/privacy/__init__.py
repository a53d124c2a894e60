"""Differential privacy: accounting, noise calibration and the mechanisms enclavefl applies.

The budget itself (`unit`, `max_epsilon`, `delta`) is part of the attested policy
(`enclavefl.tee.policy.PrivacyBudget`); this package computes what a job spends. Record
level DP-SGD with Opacus lives in `enclavefl.privacy.dpsgd` (extra `enclavefl[dp]`), which
this package does not import.
"""

from enclavefl.privacy.label import keep_probability, randomized_response
from enclavefl.privacy.rdp import ACCOUNTANT, DEFAULT_ORDERS, RdpAccountant, epsilon_for, noise_multiplier_for

__all__ = [
    "ACCOUNTANT",
    "DEFAULT_ORDERS",
    "RdpAccountant",
    "epsilon_for",
    "keep_probability",
    "noise_multiplier_for",
    "randomized_response",
]
