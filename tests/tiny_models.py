"""Tiny networks shared by the tests: residuals, functional activations, depthwise, BN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaround.models.cifar_resnet import PadShortcut


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = PadShortcut(cout) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class TinyResNet(nn.Module):
    """Stem conv+BN+ReLU, a residual block with a zero-padding shortcut, depthwise+ReLU6, FC."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = ResBlock(8, 16, stride=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dw_bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU6(inplace=True)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = self.act(self.dw_bn(self.dw(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TinyMixed(nn.Module):
    """Conv1d, ConvTranspose2d and Linear with BatchNorm1d: the other supported layer types."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(2, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 8, 8)
        self.fc_bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.conv1d(x))  # [N, 6, 16]
        y = y.reshape(-1, 6, 2, 8)
        y = F.leaky_relu(self.up_bn(self.up(y)), 0.1)  # [N, 4, 4, 16]
        y = self.fc_bn(self.fc(y.flatten(1)[:, : 4 * 4 * 8]))
        return self.head(F.gelu(y))


def tiny_resnet(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return randomize_bn(TinyResNet(), seed)


def tiny_mixed(seed: int = 0) -> TinyMixed:
    torch.manual_seed(seed)
    return randomize_bn(TinyMixed(), seed)


def images(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def sequences(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, 16, generator=torch.Generator().manual_seed(seed))


class SamePadConv(nn.Conv2d):
    """A Conv2d subclass whose forward pads first, like TF-style 'same' convolutions."""

    def __init__(self) -> None:
        super().__init__(3, 4, 3, stride=2, padding=0)
        self.stride = [2, 2]  # type: ignore[assignment]  # a list, as EfficientNet-Lite's has
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride)


def attach_act_quant(qlayer: nn.Module, bits: int, signed: bool, scale: float) -> None:
    """Give a QuantLayer an input quantizer (issue #3's ActQuant), as quantize does."""
    from adaround.nn.act_quant import ActQuant

    qlayer.act_quant = ActQuant(bits, signed, scale)
