"""The small CIFAR-10 AlexNet with BatchNorm of ZSKD / DB3KD, and its half and quarter students.

Two different networks go by this name in the reference code; `variant` picks one (widths: conv1..conv5,
fc1-fc2; "-half" and "-quarter" divide every width by 2 and 4):

* ``variant="zskd"`` (default): ZSKD's teacher (Nayak et al., 2019), which the DB3KD paper says it follows.
  Source: github.com/vcl-iisc/ZSKD, model_training/include/model_alex_full.py and model_alex_half.py
  (TensorFlow). Widths 48-128-192-192-128, fc 512-256; half 24-64-96-96-64, fc 256-128 (as in that repo);
  quarter 12-32-48-48-32, fc 128-64 (not in that repo; same rule). Layers, in order:
  conv 5x5 -> ReLU -> LRN -> max-pool 3/2 -> BN; conv 5x5 -> ReLU -> LRN -> max-pool 3/2 -> BN;
  conv 3x3 -> ReLU -> BN (twice); conv 3x3 -> ReLU -> max-pool 3/2 -> BN;
  fc -> ReLU -> dropout 0.5 -> BN (twice); fc -> logits. Convs use "same" padding, pools none
  (32 -> 15 -> 7 -> 3 pixels). LRN is TF's depth_radius 2, alpha 1e-4, beta 0.75, bias 1, which is
  PyTorch's LocalResponseNorm(size=5, alpha=5e-4) since PyTorch divides alpha by the window size.
* ``variant="db3kd"``: the network in DB3KD's released code, github.com/zwang84/zsdb3kd, models.py
  (AlexNet, AlexNetHalf, AlexNetQuarter): a CIFAR port of torchvision's AlexNet. Widths 64-192-384-256-256,
  fc 4096-4096; half 32-96-192-128-128, fc 2048-2048; quarter 16-48-96-64-64, fc 1024-1024. Layers:
  conv 3x3 stride 2 -> BN -> ReLU -> max-pool 2; conv 3x3 -> BN -> ReLU -> max-pool 2;
  conv 3x3 -> BN -> ReLU (twice); conv 3x3 -> BN -> ReLU -> max-pool 2;
  fc -> ReLU -> dropout 0.5 -> BN (twice); fc -> logits (32 -> 16 -> 8 -> 4 -> 2 pixels).

Not reproduced from either: weight initialisation (PyTorch defaults here) and ZSKD's BatchNorm epsilon
(1e-3 in TF; PyTorch's 1e-5 here). Any number of input channels; the flattened size follows the image
size, which must leave at least one pixel after the last pool (15x15 for both variants).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from db3kd.errors import ConfigError
from db3kd.models._shapes import Window, require_fits
from db3kd.models.registry import register_model

# Full-size widths: (conv1..conv5), (fc1, fc2).
_WIDTHS = {
    "zskd": ((48, 128, 192, 192, 128), (512, 256)),
    "db3kd": ((64, 192, 384, 256, 256), (4096, 4096)),
}
_DROPOUT = 0.5


class AlexNet(nn.Module):
    """Five conv layers (`features`) and three fully connected layers (`classifier`), with BatchNorm."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        divisor: int = 1,
        variant: str = "zskd",
    ):
        super().__init__()
        if variant not in _WIDTHS:
            raise ConfigError(f"alexnet variant: expected one of {', '.join(_WIDTHS)}, got {variant!r}")
        channels, height, width = input_shape
        conv_widths, fc_widths = _WIDTHS[variant]
        conv_widths = tuple(w // divisor for w in conv_widths)
        fc_widths = tuple(w // divisor for w in fc_widths)
        make_features = _zskd_features if variant == "zskd" else _db3kd_features
        self.features, windows = make_features(channels, conv_widths)
        out_h, out_w = require_fits(f"AlexNet ({variant})", height, width, windows)
        self.classifier = _classifier(conv_widths[-1] * out_h * out_w, fc_widths, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, conv5, H', W')
        return self.classifier(x.flatten(1))  # (N, classes)


def _zskd_features(channels: int, widths: tuple[int, ...]) -> tuple[nn.Sequential, list[Window]]:
    w1, w2, w3, w4, w5 = widths
    layers = OrderedDict()
    windows: list[Window] = []
    specs = [(channels, w1, 5), (w1, w2, 5), (w2, w3, 3), (w3, w4, 3), (w4, w5, 3)]  # (in, out, kernel)
    for i, (c_in, c_out, kernel) in enumerate(specs, 1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
        windows.append((kernel, 1, kernel // 2))
        if i in (1, 2):
            layers[f"lrn{i}"] = nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=1.0)
        if i in (1, 2, 5):
            layers[f"pool{i}"] = nn.MaxPool2d(kernel_size=3, stride=2)
            windows.append((3, 2, 0))
        layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
    return nn.Sequential(layers), windows


def _db3kd_features(channels: int, widths: tuple[int, ...]) -> tuple[nn.Sequential, list[Window]]:
    w1, w2, w3, w4, w5 = widths
    layers = OrderedDict()
    windows: list[Window] = []
    for i, (c_in, c_out) in enumerate([(channels, w1), (w1, w2), (w2, w3), (w3, w4), (w4, w5)], 1):
        stride = 2 if i == 1 else 1
        layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
        windows.append((3, stride, 1))
        if i in (1, 2, 5):
            layers[f"pool{i}"] = nn.MaxPool2d(kernel_size=2, stride=2)
            windows.append((2, 2, 0))
    return nn.Sequential(layers), windows


def _classifier(in_features: int, widths: tuple[int, ...], num_classes: int) -> nn.Sequential:
    # Both variants put BatchNorm after dropout, as their reference code does.
    layers = OrderedDict()
    for i, width in enumerate(widths, 1):
        layers[f"fc{i}"] = nn.Linear(in_features, width)
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
        layers[f"dropout{i}"] = nn.Dropout(_DROPOUT)
        layers[f"bn{i}"] = nn.BatchNorm1d(width)
        in_features = width
    layers[f"fc{len(widths) + 1}"] = nn.Linear(in_features, num_classes)
    return nn.Sequential(layers)


@register_model("alexnet")
def alexnet(input_shape: tuple[int, int, int], num_classes: int, *, variant: str = "zskd") -> AlexNet:
    """AlexNet for CIFAR-10: the teacher. `variant`: "zskd" (default) or "db3kd", see the module docstring."""
    return AlexNet(input_shape, num_classes, 1, variant)


@register_model("alexnet-half")
def alexnet_half(input_shape: tuple[int, int, int], num_classes: int, *, variant: str = "zskd") -> AlexNet:
    """AlexNet-half: every width halved; the usual CIFAR-10 student."""
    return AlexNet(input_shape, num_classes, 2, variant)


@register_model("alexnet-quarter")
def alexnet_quarter(input_shape: tuple[int, int, int], num_classes: int, *, variant: str = "zskd") -> AlexNet:
    """AlexNet-quarter: every width quartered; DB3KD's smaller CIFAR-10 student."""
    return AlexNet(input_shape, num_classes, 4, variant)
