"""LeNet-5 and its half / fifth students, as used by ZSKD (Nayak et al., 2019) and DB3KD (Wang, 2021).

Layer order and names match the DB3KD reference code (zwang84/zsdb3kd, models.py) and the benchmark teacher
`shared/teachers/lenet5_mnist.onnx`, so that file's initializers load as our state_dict:

    conv1(5x5) -> ReLU -> MaxPool(2) -> conv2(5x5) -> ReLU -> MaxPool(2) -> flatten -> fc1 -> ReLU -> fc2

Widths (conv1, conv2, fc1): lenet5 20-50-200 (187,780 parameters on 1x28x28, 10 classes), lenet5-half
10-25-100, lenet5-fifth 4-10-40.

Padding rule (`padding=None`): 0 when both image sides are >= 16 pixels, which is the paper's network and
the smallest size it fits (16 -> 12 -> 6 -> 2 -> 1); otherwise 2 on both convolutions, so small images such
as scikit-learn's 8x8 digits work (8 -> 8 -> 4 -> 4 -> 2). An explicit `padding` is used as given.
"""

from __future__ import annotations

from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from db3kd.errors import ConfigError
from db3kd.models._shapes import Window, require_fits
from db3kd.models.registry import register_model

_KERNEL = 5
_AUTO_PADDING_MIN_SIDE = 16  # below this the unpadded network has no pixel left after the second pool
_SMALL_IMAGE_PADDING = 2  # "same" padding for a 5x5 kernel


class LeNet5(nn.Module):
    """Two 5x5 conv + max-pool stages and two fully connected layers."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        widths: tuple[int, int, int],
        padding: int,
    ):
        super().__init__()
        channels, height, width = input_shape
        conv1_width, conv2_width, fc_width = widths
        out_h, out_w = require_fits(f"LeNet-5 with padding {padding}", height, width, _windows(padding))
        self.conv1 = nn.Conv2d(channels, conv1_width, _KERNEL, padding=padding)
        self.conv2 = nn.Conv2d(conv1_width, conv2_width, _KERNEL, padding=padding)
        self.fc1 = nn.Linear(conv2_width * out_h * out_w, fc_width)
        self.fc2 = nn.Linear(fc_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, conv1, H1, W1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, conv2, H2, W2)
        x = F.relu(self.fc1(x.flatten(1)))  # (N, fc)
        return self.fc2(x)  # (N, classes)


def _windows(padding: int) -> list[Window]:
    conv, pool = (_KERNEL, 1, padding), (2, 2, 0)
    return [conv, pool, conv, pool]


def _resolve_padding(padding: int | None, height: int, width: int) -> int:
    if padding is None:
        small = min(height, width) < _AUTO_PADDING_MIN_SIDE
        return _SMALL_IMAGE_PADDING if small else 0
    if isinstance(padding, bool) or not isinstance(padding, Integral) or padding < 0:
        raise ConfigError(f"LeNet-5 padding: expected None or an integer >= 0, got {padding!r}")
    return int(padding)


def _build(input_shape, num_classes, widths, padding) -> LeNet5:
    _, height, width = input_shape
    return LeNet5(input_shape, num_classes, widths, _resolve_padding(padding, height, width))


@register_model("lenet5")
def lenet5(input_shape: tuple[int, int, int], num_classes: int, *, padding: int | None = None) -> LeNet5:
    """LeNet-5, conv 20-50, fc 200: the MNIST / Fashion-MNIST teacher."""
    return _build(input_shape, num_classes, (20, 50, 200), padding)


@register_model("lenet5-half")
def lenet5_half(input_shape: tuple[int, int, int], num_classes: int, *, padding: int | None = None) -> LeNet5:
    """LeNet-5-half, conv 10-25, fc 100: the usual student."""
    return _build(input_shape, num_classes, (10, 25, 100), padding)


@register_model("lenet5-fifth")
def lenet5_fifth(input_shape: tuple[int, int, int], num_classes: int, *, padding: int | None = None) -> LeNet5:
    """LeNet-5-fifth, conv 4-10, fc 40: the tiny student."""
    return _build(input_shape, num_classes, (4, 10, 40), padding)
