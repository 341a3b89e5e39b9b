"""Small modules reproducing what real model zoos do (timm, torchvision, Hugging Face), for the
preparation and equivalence tests. Each names the zoo construct it stands for."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny_models import randomize_bn
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward also applies drop and act."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.drop = nn.Identity()
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         False, 0.0, self.eps)
        return self.act(self.drop(x))


class ScaledNorm2d(nn.BatchNorm2d):
    """A norm whose forward also uses its statistics for something else: folding it would
    change the network, so it must be left in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.running_var.mean()


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: statistics and affine terms as buffers."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        g = torch.Generator().manual_seed(n)
        self.register_buffer("weight", torch.rand(n, generator=g) + 0.5)
        self.register_buffer("bias", torch.rand(n, generator=g) - 0.5)
        self.register_buffer("running_mean", torch.rand(n, generator=g) - 0.5)
        self.register_buffer("running_var", torch.rand(n, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class Conv2dSame(nn.Conv2d):
    """timm's create_conv2d(..., padding='same') on a strided conv: pads in its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pad_h = max((-(ih // -self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pad_w = max((-(iw // -self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class NormActNet(nn.Module):
    """Stem conv + norm-with-activation (timm style), same-padding conv, frozen norm, SE gate,
    layer scale, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.conv2 = Conv2dSame(8, 16, 3, stride=2, bias=False)
        self.bn2 = FrozenBatchNorm2d(16)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.gamma = nn.Parameter(torch.full((16, 1, 1), 0.5))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.stem(x))
        x = F.relu(self.bn2(self.conv2(x)))
        gate = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        x = x + self.gamma * (x * gate)
        return self.head(x.mean((2, 3)))


def norm_act_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(NormActNet())


class UnfoldableNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = ScaledNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn(self.conv(x)))))


def unfoldable_norm_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(UnfoldableNormNet())


class WeightReader(nn.Module):
    """Model code that reads a layer's weight itself (edgenext, some positional encodings)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x) * self.conv.weight.shape[1]
        x = x.mean((2, 3))
        return F.linear(x, self.proj.weight, self.proj.bias) + self.proj(x)


class TypeChecker(nn.Module):
    """Forward code that checks the class of its layers: wrapping them changes the network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean((2, 3))
        return self.proj(x) if type(self.proj) is nn.Linear else x[:, :4]


class DataDependent(nn.Module):
    """A branch taken or not depending on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.extra = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.mean() > 0:
            x = self.extra(x)
        return self.head(x.mean((2, 3)))


def intrinsic_net() -> nn.Module:
    """torch.ao.nn.intrinsic fused containers: ConvBn2d, ConvBnReLU2d, LinearReLU."""
    import torch.ao.nn.intrinsic as nni

    torch.manual_seed(0)
    model = nn.Sequential(
        nni.ConvBn2d(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
        nni.ConvBnReLU2d(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nni.LinearReLU(nn.Linear(8, 6), nn.ReLU()), nn.Linear(6, 3),
    )
    return randomize_bn(model)


class Versioned(nn.Module):
    """A module that checks its state-dict version on load (torchvision's MNASNet)."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).mean((2, 3)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):  # type: ignore[no-untyped-def]
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class TwoInputs(nn.Module):
    """A model with two inputs (an image and a side vector), e.g. a conditioned network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.side = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(image))).mean((2, 3))
        return self.head(x + self.side(extra))


class TokensAndMask(nn.Module):
    """Hugging Face style: `input_ids` (integers) and an `attention_mask` keyword input, a
    dict-like output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        h = self.embed(input_ids)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        mask = attention_mask.unsqueeze(-1).float() if attention_mask is not None else 1.0
        return {"last_hidden_state": h, "pooled": (h * mask).sum(1)}


class AuxHead(nn.Module):
    """torchvision's GoogLeNet / Inception v3: an auxiliary classifier run in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.aux = nn.Linear(8, 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)).mean((2, 3))
        if self.training:
            return self.head(x) + self.aux(x)
        return self.head(x)


class TracesDifferently(nn.Module):
    """Code that takes another path under torch.fx tracing (some Hugging Face models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)).mean((2, 3))
        if torch.fx._symbolic_trace.is_fx_tracing():
            x = x * 2
        return self.head(x)
