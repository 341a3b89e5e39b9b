"""CIFAR-10 ResNets (He et al. 2016, section 4.2) with parameter-free "option A" shortcuts.

The module names match the widely used pretrained checkpoints (``resnet20.th``, ``resnet56.th``):
``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}`` and ``linear``. Inputs are [0, 1]
RGB images normalised with :data:`CIFAR_MEAN` / :data:`CIFAR_STD`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adaround.models.weights import load_weights

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "resnet20",
    "resnet56",
]

#: Per-channel input normalisation the pretrained CIFAR-10 weights expect (on [0, 1] RGB).
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``planes // 4`` channels on each side."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad}"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if in_planes + 2 * (planes // 4) != planes:
                raise ValueError(f"option-A shortcut cannot map {in_planes} to {planes} channels")
            self.shortcut: nn.Module = PadShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: widths 16/32/64, ``n`` basic blocks per stage."""

    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _build(n: int, weights: str | Path | None) -> CifarResNet:
    model = CifarResNet((n, n, n))
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def resnet20(weights: str | Path | None = None) -> CifarResNet:
    """ResNet-20 (0.27 M parameters); loads ``weights`` (e.g. ``resnet20.th``) if given.

    The model is returned in eval mode.
    """
    return _build(3, weights)


def resnet56(weights: str | Path | None = None) -> CifarResNet:
    """ResNet-56 (0.85 M parameters); loads ``weights`` (e.g. ``resnet56.th``) if given.

    The model is returned in eval mode.
    """
    return _build(9, weights)
