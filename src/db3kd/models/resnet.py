"""CIFAR-style ResNet-18 / ResNet-34 (He et al., 2016, as commonly adapted to 32x32 images).

Differences from the ImageNet ResNet: a 3x3 stride-1 stem convolution with 64 channels and no max-pool, so
a 32x32 image reaches the last stage at 4x4. BasicBlock stages [2, 2, 2, 2] (ResNet-18) or [3, 4, 6, 3]
(ResNet-34) with widths 64-128-256-512, strides 1-2-2-2, a 1x1 convolution + BatchNorm shortcut where the
shape changes, global average pooling and one fully connected layer. With 10 classes: 11,173,962
(ResNet-18) and 21,282,122 (ResNet-34) parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from db3kd.errors import ConfigError
from db3kd.models.registry import register_model

_STAGE_WIDTHS = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)
# The stages downsample 8x; below 8 pixels the last stages would only see a single pixel.
_MIN_SIDE = 8


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, four BasicBlock stages, global average pooling, fc."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, blocks: tuple[int, int, int, int]):
        super().__init__()
        channels, height, width = input_shape
        if min(height, width) < _MIN_SIDE:
            raise ConfigError(
                f"ResNet: expected images of at least {_MIN_SIDE}x{_MIN_SIDE} pixels, got {height}x{width}"
            )
        self.conv1 = nn.Conv2d(channels, _STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_WIDTHS[0])
        stages = []
        in_channels = _STAGE_WIDTHS[0]
        for n_blocks, out_channels, stride in zip(blocks, _STAGE_WIDTHS, _STAGE_STRIDES):
            strides = [stride] + [1] * (n_blocks - 1)  # only a stage's first block downsamples
            stage = []
            for s in strides:
                stage.append(BasicBlock(in_channels, out_channels, s))
                in_channels = out_channels
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (N, 64, H, W)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 512, H/8, W/8)
        x = x.mean(dim=(2, 3))  # (N, 512), global average pool
        return self.fc(x)  # (N, classes)


@register_model("resnet18")
def resnet18(input_shape: tuple[int, int, int], num_classes: int) -> ResNet:
    """CIFAR ResNet-18, BasicBlock stages [2, 2, 2, 2]."""
    return ResNet(input_shape, num_classes, (2, 2, 2, 2))


@register_model("resnet34")
def resnet34(input_shape: tuple[int, int, int], num_classes: int) -> ResNet:
    """CIFAR ResNet-34, BasicBlock stages [3, 4, 6, 3]."""
    return ResNet(input_shape, num_classes, (3, 4, 6, 3))
