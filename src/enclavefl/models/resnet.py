"""CIFAR ResNet v2: pre-activation residual networks (He et al. 2016, "Identity Mappings").

Depth 6n+2 with basic blocks: a 3x3 stem conv with 16 filters, three stages of n blocks
with 16, 32 and 64 filters (stride 2 into stages 2 and 3), a final BN-ReLU, global
average pooling and a linear classifier. CCZoo's TensorFlow reference trains ResNet-56 v2.
Where a block changes shape its shortcut is a 1x1 convolution of the pre-activated input,
as in the TensorFlow official model; elsewhere it is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from enclavefl.errors import UsageError
from enclavefl.validate import is_int

__all__ = ["InvalidDepthError", "PreActBlock", "ResNetV2", "resnet_v2"]

_STAGE_WIDTHS = (16, 32, 64)


class InvalidDepthError(UsageError, ValueError):
    """A ResNet depth that is not 6n+2 (a UsageError, and a ValueError for torch-style callers)."""


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class ResNetV2(nn.Module):
    """Pre-activation ResNet for 32x32 images; input NCHW float, output [N, num_classes] logits."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, _STAGE_WIDTHS[0], 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        channels = _STAGE_WIDTHS[0]
        for stage, width in enumerate(_STAGE_WIDTHS):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(PreActBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.bn_final = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        out = torch.relu(self.bn_final(out))
        return self.fc(out.mean(dim=(2, 3)))


def resnet_v2(depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> ResNetV2:
    """CIFAR ResNet v2 of `depth` = 6n+2 layers (20: ~0.27 M parameters, 56: ~0.85 M)."""
    if not is_int(depth) or depth < 8 or (depth - 2) % 6:
        raise InvalidDepthError(
            f"ResNet v2 depth must be 6n+2 with n >= 1 (8, 14, 20, 26, 32, 44, 56, 110, ...), got {depth!r}"
        )
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    return ResNetV2((depth - 2) // 6, num_classes=num_classes, in_channels=in_channels)
