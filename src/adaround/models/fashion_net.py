"""FashionNet: a small CNN for Fashion-MNIST used by the built-in AdaRound demo.

It is deliberately built from the layer patterns that real networks use, so the demo
exercises them: Conv+BN+ReLU, a residual block with a functional ReLU and an addition,
a depthwise conv followed by BN and ReLU6, a pointwise conv, global average pooling and a
Linear head. The committed weights (``fashion_net.pt`` next to this file) were produced by
``scripts/train_fashion_net.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WEIGHTS_PATH", "BasicBlock", "FashionNet", "fashion_net"]

logger = logging.getLogger(__name__)

#: Location of the pretrained state_dict shipped with the package.
WEIGHTS_PATH = Path(__file__).parent / "fashion_net.pt"


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    """Two 3x3 Conv+BN layers with an identity shortcut; ReLUs are functional."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class FashionNet(nn.Module):
    """Small CNN for ``1 x 28 x 28`` inputs and 10 classes (about 57k parameters).

    Layout (spatial size in brackets)::

        stem  Conv3x3(1->16)+BN+ReLU                        [28]
        down  Conv3x3(16->48, stride 2)+BN+ReLU             [14]
        block BasicBlock(48): residual add + F.relu         [14]
        dw    depthwise Conv3x3(48, stride 2)+BN+ReLU6      [7]
        pw    pointwise Conv1x1(48->128)+BN+ReLU            [7]
        pool  global average pooling                        [1]
        fc    Linear(128->10)
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, 16, 3), nn.ReLU())
        self.down = nn.Sequential(*_conv_bn(16, 48, 3, stride=2), nn.ReLU())
        self.block = BasicBlock(48)
        self.dw = nn.Sequential(*_conv_bn(48, 48, 3, stride=2, groups=48), nn.ReLU6())
        self.pw = nn.Sequential(*_conv_bn(48, 128, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.down(x)
        x = self.block(x)
        x = self.dw(x)
        x = self.pw(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def fashion_net(pretrained: bool = True) -> FashionNet:
    """Build a :class:`FashionNet` in eval mode.

    Args:
        pretrained: Load the committed weights from ``fashion_net.pt``.

    Raises:
        FileNotFoundError: If ``pretrained`` and the weights file is missing.
    """
    model = FashionNet()
    if pretrained:
        if not WEIGHTS_PATH.is_file():
            raise FileNotFoundError(
                f"FashionNet weights not found at {WEIGHTS_PATH}; the file is part of the "
                "adaround package (regenerate it with scripts/train_fashion_net.py)."
            )
        state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        logger.debug("loaded FashionNet weights from %s", WEIGHTS_PATH)
    return model.eval()
