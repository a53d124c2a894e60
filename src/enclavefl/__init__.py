"""enclavefl: confidential federated learning between mutually attested TEEs."""

__version__ = "0.1.0"
