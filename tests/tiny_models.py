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


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 -> 1x1, `out += identity` with a conv downsample."""

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1, depthwise 3x3, project 1x1; a skip only when shapes
    allow (so the first block of a stage has none)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_skip = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_skip else self.conv(x)


class TinyBottleneckNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1 = nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 4), Bottleneck(16, 8, 2))
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(F.relu(self.stem(x))).mean(dim=(2, 3)))


class TinyMobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.features = nn.Sequential(InvertedResidual(8, 8, 1), InvertedResidual(8, 16, 2),
                                      InvertedResidual(16, 16, 1))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(F.relu6(self.stem(x))).mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2))
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class AttentionOutput(nn.Module):
    """BERT-style: the residual is added inside a submodule, from a second argument."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dense(h) + residual)


class PreNormLayer(nn.Module):
    """GPT-style layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), SelfAttention(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PostNormLayer(nn.Module):
    """BERT-style layer: no residual add in its own forward."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention, self.attn_out = SelfAttention(dim), AttentionOutput(dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), AttentionOutput(2 * dim)
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_out(self.attention(x), x)
        return self.proj(self.down(F.gelu(self.up(h)), F.gelu(self.up(h))))


class TinyTransformer(nn.Module):
    """Embedding-free: inputs are [N, T, 3] features; a ModuleList of transformer layers."""

    def __init__(self, post_norm: bool = False, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(3, dim)
        layer = PostNormLayer if post_norm else PreNormLayer
        self.layers = nn.ModuleList(layer(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def tokens(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, 3, generator=torch.Generator().manual_seed(seed))
