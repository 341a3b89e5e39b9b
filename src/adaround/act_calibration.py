"""Activation ranges from calibration data: one ActQuant on the input of every quantized layer.

One pass of the network in float (weights not yet rounded, activations not quantized) records,
for each quantized layer's input, its minimum and maximum and a seeded random sample of its
elements (about 2^18 per layer over the whole calibration set). From these, per layer:

* unsigned grid where the minimum is >= 0 (inputs after ReLU/ReLU6), signed otherwise;
* the scale by `act_range`: "minmax" covers the observed range (the paper's W4A8); "mse"
  picks the clipping that minimises ||fake_quant(x) - x||^2 on the sample; "percentile" clips
  at `act_percentile` of |x| on the sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from adaround.config import QuantConfig
from adaround.nn.act_quant import ActQuant
from adaround.nn.quant_layer import QuantLayer
from adaround.primitives import int_range

log = logging.getLogger(__name__)

SAMPLE_SIZE = 2**18  # elements per layer kept for the MSE and percentile searches
GRID_POINTS = 100


class _Observer:
    def __init__(self, per_call: int, generator: torch.Generator) -> None:
        self.lo, self.hi = math.inf, -math.inf
        self.samples: list[Tensor] = []
        self.per_call, self.generator = per_call, generator

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        flat = x.reshape(-1)
        if flat.numel() > self.per_call:
            idx = torch.randint(flat.numel(), (self.per_call,), generator=self.generator)
            flat = flat[idx.to(flat.device)]
        self.samples.append(flat.float().cpu())

    def sample(self) -> Tensor:
        return torch.cat(self.samples)


@contextmanager
def _observing(layers: dict[str, QuantLayer], per_call: int, seed: int
               ) -> Iterator[dict[str, _Observer]]:
    generator = torch.Generator().manual_seed(seed)
    observers = {name: _Observer(per_call, generator) for name in layers}
    handles = [layer.register_forward_pre_hook(observers[name])
               for name, layer in layers.items()]
    try:
        yield observers
    finally:
        for handle in handles:
            handle.remove()


def _mse_scale(sample: Tensor, limit: float, qmin: int, qmax: int) -> float:
    """The clipping of [0, limit] that minimises the MSE: the best of 100 ratios 1.0 .. 0.01,
    then of 100 ratios between its two neighbours (outliers put the optimum at a few %)."""

    def best_of(ratios: list[float]) -> tuple[float, float]:
        errs = []
        for ratio in ratios:
            scale = limit * ratio / qmax
            q = torch.clamp(torch.round(sample / scale), qmin, qmax) * scale
            errs.append(float((q - sample).pow(2).sum()))
        i = min(range(len(ratios)), key=errs.__getitem__)
        return ratios[i], errs[i]

    coarse = torch.linspace(1.0, 0.01, GRID_POINTS).tolist()
    ratio, _ = best_of(coarse)
    step = coarse[0] - coarse[1]
    fine = torch.linspace(min(ratio + step, 1.0), max(ratio - step, 1e-4), GRID_POINTS).tolist()
    ratio, _ = best_of(fine + [ratio])
    return limit * ratio / qmax


def choose_scale(sample: Tensor, lo: float, hi: float, bits: int, signed: bool, method: str,
                 percentile: float = 99.99) -> float:
    """The step of a `bits`-bit zero-point-0 grid for data with range [lo, hi] and `sample`.

    Example:
        >>> choose_scale(torch.tensor([0.0, 1.5]), 0.0, 1.5, 4, signed=False, method="minmax")
        0.1
    """
    qmin, qmax = int_range(bits, signed)
    limit = max(abs(lo), abs(hi)) if signed else max(hi, 0.0)
    if limit <= 0 or not math.isfinite(limit):
        return 1.0  # an all-zero input: any step represents it exactly
    if method == "percentile":
        k = max(1, min(sample.numel(), math.ceil(sample.numel() * percentile / 100)))
        limit = min(limit, float(sample.abs().kthvalue(k).values)) or limit
    elif method == "mse":
        return _mse_scale(sample, limit, qmin, qmax)
    return limit / qmax


def act_bits_of(name: str, order: list[str], cfg: QuantConfig) -> int:
    """Bits of a layer's input: the model input's, the last layer's, or act_bits."""
    assert cfg.act_bits is not None
    if order and name == order[-1] and cfg.last_act_bits is not None:
        return cfg.last_act_bits
    if order and name == order[0] and cfg.input_act_bits is not None:
        return cfg.input_act_bits
    return cfg.act_bits


def calibrate_activations(qmodel: nn.Module, names: list[str], order: list[str], x: Tensor,
                          cfg: QuantConfig, chunk: int = 128) -> dict[str, ActQuant]:
    """Attach an ActQuant, with its range from `x`, to each QuantLayer in `names`.

    `order` is the execution order of the model's layers (its first reads the model input, its
    last is the last layer). Layers that the forward pass never reaches get none.
    """
    layers = {n: qmodel.get_submodule(n) for n in names}
    for layer in layers.values():
        layer.act_quant = None  # observe float inputs
    chunks = list(x.split(chunk))
    per_call = max(1, SAMPLE_SIZE // max(len(chunks), 1))
    with torch.no_grad(), _observing(layers, per_call, cfg.seed) as observers:
        for batch in chunks:
            qmodel(batch)
    attached = {}
    for name, layer in layers.items():
        obs = observers[name]
        if not obs.samples:
            log.warning("layer %s never saw an input: its activations stay in float", name)
            continue
        bits, signed = act_bits_of(name, order, cfg), obs.lo < 0
        scale = choose_scale(obs.sample(), obs.lo, obs.hi, bits, signed, cfg.act_range or "minmax",
                             cfg.act_percentile)
        device = layer.scale.device
        layer.act_quant = ActQuant(bits, signed, scale).to(device)
        attached[name] = layer.act_quant
    return attached


def describe_convention(cfg: QuantConfig, order: list[str]) -> str:
    """One line: which bits the activations, the model input and the last layer's input get."""
    if cfg.act_bits is None:
        return "activations in float (A32)"
    first = cfg.input_act_bits or cfg.act_bits
    last = cfg.last_act_bits or cfg.act_bits
    weights = (f"W{cfg.weight_bits}, first/last layer weights W{cfg.first_last_bits}"
               if cfg.first_last_bits else f"W{cfg.weight_bits} everywhere")
    eight = cfg.first_last_bits == 8 and first == 8 and last == 8
    convention = ("first/last layers 8-bit (BRECQ/QDrop convention)" if eight and cfg.act_bits < 8
                  else "all layers at the same bits (the paper's W4A8 convention)"
                  if first == last == cfg.act_bits and not cfg.first_last_bits
                  else "custom first/last bits")
    return (f"activations A{cfg.act_bits} per tensor ({cfg.act_range} ranges), model input "
            f"({order[0] if order else '-'}) A{first}, last layer input "
            f"({order[-1] if order else '-'}) A{last}; {weights}: {convention}")
