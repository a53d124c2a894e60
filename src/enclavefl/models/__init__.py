"""Models: CIFAR ResNet v2, DLRM, wide&deep (vertical split), MLPs (and their Keras twins).

Conventions: every model returns logits of shape [N, out_features], never probabilities.
Binary models have out_features=1: use BCEWithLogitsLoss on `logits.squeeze(-1)`.
This package is a leaf: it knows nothing of the network, the TEE or FL.
"""

from enclavefl.models.dlrm import DLRM
from enclavefl.models.embeddings import FieldEmbedding, embedding_parameter_names
from enclavefl.models.keras_mlp import KERAS_BUILTINS, keras_bottom_mlp, keras_mlp, keras_top_mlp
from enclavefl.models.mlp import mlp
from enclavefl.models.registry import BUILTINS, build_model
from enclavefl.models.resnet import ResNetV2, resnet_v2
from enclavefl.models.split_mlp import BottomMLP, TopMLP
from enclavefl.models.wide_deep import (
    UnsplitWideDeep,
    WideDeepFollower,
    WideDeepLeader,
    unsplit_wide_deep,
)

__all__ = [
    "BUILTINS",
    "KERAS_BUILTINS",
    "DLRM",
    "BottomMLP",
    "FieldEmbedding",
    "ResNetV2",
    "TopMLP",
    "UnsplitWideDeep",
    "WideDeepFollower",
    "WideDeepLeader",
    "build_model",
    "embedding_parameter_names",
    "keras_bottom_mlp",
    "keras_mlp",
    "keras_top_mlp",
    "mlp",
    "resnet_v2",
    "unsplit_wide_deep",
]
