"""Preparation: fold BatchNorm, choose the layers to quantize, swap in QuantLayer twins."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adaround.config import QuantConfig
from adaround.errors import ModelError
from adaround.nn.quant_layer import QUANTIZABLE, QuantLayer, output_channel_axis
from adaround.trace import LayerInfo, Trace, is_frozen_norm

log = logging.getLogger(__name__)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def _norm_terms(bn: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, std, gamma, beta) of an eval-mode BatchNorm or frozen norm."""
    mean, var = bn.running_mean, bn.running_var
    std = torch.sqrt(var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    return mean, std, gamma, beta


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm (or frozen norm) into the preceding layer's weight and bias."""
    mean, std, gamma, beta = _norm_terms(bn)
    factor = gamma / std
    axis = output_channel_axis(layer)
    shape = [1] * layer.weight.dim()
    shape[axis] = -1
    layer.weight.mul_(factor.reshape(shape))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(mean)
    new_bias = (bias - mean) * factor + beta
    layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))


@torch.no_grad()
def neutralise_norm(bn: nn.Module) -> None:
    """Make a norm's affine normalisation exactly the identity (mean 0, variance 1, eps 0,
    weight 1, bias 0) and keep the module: whatever else its forward does (timm's
    BatchNormAct2d applies its activation and drop-out there) still runs."""
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0
    if bn.weight is not None:
        bn.weight.fill_(1.0)
    if bn.bias is not None:
        bn.bias.zero_()
    bn.adaround_neutral = True


def _plain_batchnorm(bn: nn.Module) -> bool:
    """A torch BatchNorm whose forward is torch's own: replacing it by Identity is exact."""
    return (isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and type(bn).forward is nn.modules.batchnorm._BatchNorm.forward
            and not bn._forward_hooks and not bn._forward_pre_hooks)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if getattr(bn, "adaround_neutral", False):
        return False
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        if bn.running_mean is None:
            return False
    elif not is_frozen_norm(bn):
        return False
    groups = getattr(layer, "groups", 1)
    transposed = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    return not (transposed and groups != 1)


def fold_pair(model: nn.Module, layer_name: str, bn_name: str) -> None:
    """Fold norm `bn_name` into layer `layer_name`: a plain BatchNorm becomes Identity, any
    other norm stays in place with its normalisation made the identity."""
    bn = model.get_submodule(bn_name)
    fold_bn_into(model.get_submodule(layer_name), bn)
    if _plain_batchnorm(bn):
        set_submodule(model, bn_name, nn.Identity())
    else:
        neutralise_norm(bn)


def fold_batchnorms(model: nn.Module, trace: Trace,
                    keep: frozenset[str] = frozenset()) -> dict[str, str]:
    """Fold every BatchNorm that is the sole consumer of a layer's output (except the norms
    named in `keep`); returns the pairs {layer: norm}."""
    folded: dict[str, str] = {}
    for info in trace.layers:
        if info.batchnorm is None or info.batchnorm in keep:
            continue
        layer, bn = model.get_submodule(info.name), model.get_submodule(info.batchnorm)
        if isinstance(layer, QuantLayer) or not _foldable(layer, bn):
            continue
        fold_pair(model, info.name, info.batchnorm)
        folded[info.name] = info.batchnorm
    return folded


def apply_folds(model: nn.Module, folded: dict[str, str]) -> None:
    """Repeat a recorded folding on a fresh copy of the same architecture (used by load)."""
    for layer_name, bn_name in folded.items():
        fold_pair(model, layer_name, bn_name)


@dataclass
class LayerPlan:
    name: str
    bits: int
    info: LayerInfo | None  # None when the forward pass never called the layer

    @property
    def reconstructable(self) -> bool:
        return self.info is not None and self.info.calls == 1


def _selected(name: str, cfg: QuantConfig) -> bool:
    if cfg.include and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude)


def plan_layers(model: nn.Module, trace: Trace, cfg: QuantConfig) -> list[LayerPlan]:
    """Layers to quantize with their bit width, in execution order (unused layers last)."""
    candidates = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    if not candidates:
        weighted = [(n, type(m).__name__) for n, m in model.named_modules()
                    if isinstance(getattr(m, "weight", None), nn.Parameter)
                    and m.weight.dim() >= 2]
        kinds = sorted({k for _, k in weighted})
        first = next((f"{n} ({k})" for n, k in weighted if k != "Embedding"), None)
        seen = f" (its layers with weights: {', '.join(kinds[:6])}" if kinds else ""
        seen += f"; the first is {first})" if first and seen else (")" if seen else "")
        raise ModelError(
            f"{type(model).__name__} has no quantizable layer{seen}: adaround quantizes "
            "Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear modules (functional convolutions "
            "and other layer types, e.g. transformers' Conv1D, are not seen)"
        )
    infos = {info.name: info for info in trace.layers}
    executed = [n for n in trace.names() if _selected(n, cfg)]
    unused = [n for n in candidates if n not in infos and _selected(n, cfg)]
    if not executed and not unused:
        raise ModelError(
            f"include={list(cfg.include)} / exclude={list(cfg.exclude)} leave no layer to "
            f"quantize; the quantizable layers are: {', '.join(candidates[:10])}"
        )
    for name in unused:
        log.warning("layer %s is never called in forward: rounded to nearest", name)
    ends = {trace.names()[0], trace.names()[-1]} if trace.layers else set()
    plans = []
    for name in executed + unused:
        bits = cfg.first_last_bits if cfg.first_last_bits and name in ends else cfg.weight_bits
        plans.append(LayerPlan(name, bits, infos.get(name)))
        info = infos.get(name)
        if info is not None and info.calls > 1:
            log.warning("layer %s is called %d times per forward: rounded to nearest",
                        name, info.calls)
    return plans


def swap_in_quant_layers(model: nn.Module, plans: list[LayerPlan], cfg: QuantConfig,
                         fit: bool = True) -> nn.Module:
    """Replace each planned layer by a QuantLayer (grid fitted to its weights when `fit`).

    Returns the model, which is itself the QuantLayer when the model is a single layer.
    """
    for plan in plans:
        qlayer = QuantLayer(model.get_submodule(plan.name), plan.bits, cfg.symmetric,
                            cfg.per_channel, cfg.group_size)
        if fit:
            qlayer.fit_grid(cfg.scale_method)
        if not plan.name:
            return qlayer
        set_submodule(model, plan.name, qlayer)
    return model
