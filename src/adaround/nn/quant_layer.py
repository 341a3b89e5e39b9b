"""QuantLayer: a Conv/ConvTranspose/Linear twin that computes with integer codes times scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from adaround.primitives import dequantize, int_range, quantize_nearest
from adaround.quantizers import broadcast_shape, fit_grid

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
QUANTIZABLE: tuple[type[nn.Module], ...] = (*_CONV, *_CONV_T, nn.Linear)
_STANDARD_FORWARDS = {cls.forward for cls in QUANTIZABLE}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

MODES = ("float", "quantized")


def output_channel_axis(layer: nn.Module) -> int:
    """Axis of the weight that indexes output channels (ConvTranspose stores them second)."""
    if isinstance(layer, _CONV_T) and layer.groups == 1:
        return 1
    return 0


def apply_layer(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """Run `layer`'s operation with `weight` in place of its own.

    Subclasses with their own forward (e.g. TF-style "same" padding convolutions) run that
    forward with the weight swapped in; the standard layers take a direct functional path.
    """
    if type(layer).forward not in _STANDARD_FORWARDS:
        return functional_call(layer, {"weight": weight}, (x,))
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    if isinstance(layer, _CONV):
        return layer._conv_forward(x, weight, layer.bias)
    if isinstance(layer, _CONV_T):
        fn = _CONV_T_FN[weight.dim() - 2]
        return fn(
            x, weight, layer.bias, layer.stride, layer.padding, layer.output_padding,
            layer.groups, layer.dilation,
        )
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


class QuantLayer(nn.Module):
    """Wraps a float layer; in "quantized" mode its weight is (codes - zero_point) * scale.

    The float layer is kept (for reconstruction and analysis); the bias stays in float,
    as in the paper.
    """

    def __init__(self, layer: nn.Module, bits: int, symmetric: bool, per_channel: bool) -> None:
        super().__init__()
        if not isinstance(layer, QUANTIZABLE):
            raise TypeError(f"cannot quantize {type(layer).__name__}")
        self.layer = layer
        self.bits = bits
        self.symmetric = symmetric
        self.axis: int | None = output_channel_axis(layer) if per_channel else None
        self.qmin, self.qmax = int_range(bits, symmetric)
        shape = broadcast_shape(layer.weight, self.axis)
        ref = layer.weight
        self.register_buffer("scale", torch.ones(shape, dtype=ref.dtype, device=ref.device))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=ref.dtype, device=ref.device))
        code_dtype = torch.int8 if symmetric else torch.uint8
        self.register_buffer("codes", torch.zeros(ref.shape, dtype=code_dtype, device=ref.device))
        self.mode = "float"

    @property
    def channel_dim(self) -> int:
        """Dimension of the layer's *output* that holds channels."""
        return -1 if isinstance(self.layer, nn.Linear) else 1

    def fit_grid(self, method: str) -> None:
        w = self.layer.weight
        scale, zero_point = fit_grid(w, self.bits, self.symmetric, self.axis, method)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def nearest_codes(self) -> Tensor:
        w = self.layer.weight.detach()
        return quantize_nearest(w, self.scale, self.zero_point, self.qmin, self.qmax)

    def set_codes(self, codes: Tensor) -> None:
        """Store integer codes and switch to quantized mode."""
        self.codes.copy_(codes.round().to(self.codes.dtype))
        self.mode = "quantized"

    def quantized_weight(self) -> Tensor:
        return dequantize(self.codes.to(self.scale.dtype), self.scale, self.zero_point)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "float":
            return self.layer(x)
        return apply_layer(self.layer, x, self.quantized_weight())

    def extra_repr(self) -> str:
        grid = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, {grid}, mode={self.mode}"
