"""Data: loaders (CIFAR-10, Criteo, FATE-style CSV, scikit-learn bundles, synthetic
wide&deep), row and column partitioners, and torch helpers.

This package is a leaf: it knows nothing of the network, the TEE or FL.
"""

from enclavefl.data.cifar10 import download_cifar10, load_cifar10, normalize
from enclavefl.data.criteo import CriteoArrays, hash_category, iter_criteo, load_criteo
from enclavefl.data.partition import partition, split_columns, split_dirichlet, split_iid
from enclavefl.data.synthetic import (
    WideDeepFiles,
    WideDeepParty,
    load_wide_deep_party,
    make_wide_deep_data,
)
from enclavefl.data.tabular import Table, load_fate_csv, load_sklearn
from enclavefl.data.tensors import batch_indices, tensor_dataset

__all__ = [
    "CriteoArrays",
    "Table",
    "WideDeepFiles",
    "WideDeepParty",
    "batch_indices",
    "download_cifar10",
    "hash_category",
    "iter_criteo",
    "load_cifar10",
    "load_criteo",
    "load_fate_csv",
    "load_sklearn",
    "load_wide_deep_party",
    "make_wide_deep_data",
    "normalize",
    "partition",
    "split_columns",
    "split_dirichlet",
    "split_iid",
    "tensor_dataset",
]
