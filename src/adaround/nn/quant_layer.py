"""QuantLayer: a Conv/ConvTranspose/Linear (or Embedding) twin computing with codes times scale."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from adaround.errors import ConfigError
from adaround.primitives import dequantize, int_range, quantize_nearest
from adaround.quantizers import expand_grid, fit_grid, grid_shape

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
QUANTIZABLE: tuple[type[nn.Module], ...] = (*_CONV, *_CONV_T, nn.Linear)
# Embeddings are wrapped only where asked (adaround.hf), and always rounded to nearest: for a
# lookup table the layer-wise loss is each row's own error, which nearest rounding minimises.
WRAPPABLE: tuple[type[nn.Module], ...] = (*QUANTIZABLE, nn.Embedding)
_STANDARD_FORWARDS = {cls.forward for cls in WRAPPABLE}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

MODES = ("float", "quantized")


def output_channel_axis(layer: nn.Module) -> int:
    """Axis of the weight that indexes output channels (ConvTranspose stores them second)."""
    if isinstance(layer, _CONV_T) and layer.groups == 1:
        return 1
    return 0


def apply_layer(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """Run `layer`'s operation with `weight` in place of its own.

    Subclasses with their own forward (e.g. TF-style "same" padding convolutions) and layers
    with hooks (the user's, e.g. feature extraction) run through the module with the weight
    swapped in; the standard layers take a direct functional path.
    """
    if (type(layer).forward not in _STANDARD_FORWARDS or layer._forward_hooks
            or layer._forward_pre_hooks):  # the module's own call: its hooks run too
        return functional_call(layer, {"weight": weight}, (x,))
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    if isinstance(layer, nn.Embedding):
        return F.embedding(x, weight, layer.padding_idx, layer.max_norm, layer.norm_type,
                           layer.scale_grad_by_freq, layer.sparse)
    if isinstance(layer, _CONV):
        return layer._conv_forward(x, weight, layer.bias)
    if isinstance(layer, _CONV_T):
        fn = _CONV_T_FN[weight.dim() - 2]
        return fn(
            x, weight, layer.bias, layer.stride, layer.padding, layer.output_padding,
            layer.groups, layer.dilation,
        )
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


def _check_groups(layer: nn.Module, group_size: int | None) -> None:
    if group_size is None:
        return
    if not isinstance(layer, (nn.Linear, nn.Embedding)):
        raise ConfigError(
            f"group_size={group_size} applies to Linear and Embedding layers, not "
            f"{type(layer).__name__}: exclude the convolutions (exclude=...) or set group_size=None"
        )
    width = layer.weight.shape[1]
    if width % group_size:
        raise ConfigError(
            f"group_size={group_size} does not divide the input dimension {width} of a "
            f"{type(layer).__name__} {tuple(layer.weight.shape)}: pick a divisor of {width} "
            "(e.g. 32, 64 or 128 where they divide it) or exclude that layer"
        )


class QuantLayer(nn.Module):
    """Wraps a float layer; in "quantized" mode its weight is (codes - zero_point) * scale.

    The float layer is kept (for reconstruction and analysis); the bias stays in float,
    as in the paper.
    """

    def __init__(self, layer: nn.Module, bits: int, symmetric: bool, per_channel: bool,
                 group_size: int | None = None) -> None:
        super().__init__()
        if not isinstance(layer, WRAPPABLE):
            raise TypeError(f"cannot quantize {type(layer).__name__}")
        _check_groups(layer, group_size)
        self.bits = bits
        self.symmetric = symmetric
        self.group_size = group_size
        per_channel = per_channel or group_size is not None
        self.axis: int | None = output_channel_axis(layer) if per_channel else None
        self.qmin, self.qmax = int_range(bits, symmetric)
        shape = grid_shape(layer.weight, self.axis, group_size)
        ref = layer.weight
        self.register_buffer("scale", torch.ones(shape, dtype=ref.dtype, device=ref.device))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=ref.dtype, device=ref.device))
        code_dtype = torch.int8 if symmetric else torch.uint8
        self.register_buffer("codes", torch.zeros(ref.shape, dtype=code_dtype, device=ref.device))
        self.mode = "float"
        # fake quantization of this layer's input (an ActQuant, nn/act_quant.py), or None
        self.act_quant: nn.Module | None = None
        # last: until then attribute look-ups must not reach the wrapped layer's attributes
        # (timm's ScaledStdConv2d has a float `scale`, which made register_buffer refuse)
        self.layer = layer

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapped layer has (`weight`, `bias`, `in_channels`, `stride`, ...)
        read through, so model code that reads them from the module it called still works;
        `weight` is the weight the layer computes with (the quantized one once rounded)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("__") or "layer" not in modules:
                raise
            if name == "weight" and self.__dict__.get("mode") == "quantized":
                return self.quantized_weight()
            return getattr(modules["layer"], name)

    @property
    def channel_dim(self) -> int:
        """Dimension of the layer's *output* that holds channels."""
        return -1 if isinstance(self.layer, nn.Linear) else 1

    def fit_grid(self, method: str) -> None:
        w = self.layer.weight
        scale, zero_point = fit_grid(w, self.bits, self.symmetric, self.axis, method,
                                     self.group_size)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def weight_scale(self) -> Tensor:
        """The scale of every weight, shaped as the weight (groups repeated, channels expanded).

        Everything that combines the grid with the weight goes through this and
        `weight_zero_point`, so per-tensor, per-channel and group grids take one code path.
        """
        return expand_grid(self.scale, self.layer.weight, self.group_size)

    def weight_zero_point(self) -> Tensor:
        return expand_grid(self.zero_point, self.layer.weight, self.group_size)

    def nearest_codes(self) -> Tensor:
        w = self.layer.weight.detach()
        return quantize_nearest(w, self.weight_scale(), self.weight_zero_point(), self.qmin,
                                self.qmax)

    def set_codes(self, codes: Tensor) -> None:
        """Store integer codes and switch to quantized mode."""
        self.codes.copy_(codes.round().to(self.codes.dtype))
        self.mode = "quantized"

    def quantized_weight(self) -> Tensor:
        return dequantize(self.codes.to(self.scale.dtype), self.weight_scale(),
                          self.weight_zero_point())

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        if self.mode == "float":
            return self.layer(x)
        return apply_layer(self.layer, x, self.quantized_weight())

    def extra_repr(self) -> str:
        grid = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        if self.group_size is not None:
            grid = f"group({self.group_size})"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, {grid}, mode={self.mode}"
