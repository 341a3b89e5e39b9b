"""The AdaRound optimisation of one layer (paper, eq. 21 and 25)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from adaround.config import QuantConfig
from adaround.nn.quant_layer import QuantLayer, apply_layer
from adaround.primitives import (
    beta_at,
    dequantize,
    hard_codes,
    init_v,
    reconstruction_loss,
    rectified_sigmoid,
    round_regularizer,
    soft_weight,
)

EVAL_SAMPLES = 1024


@dataclass(frozen=True)
class LayerResult:
    """What one layer's reconstruction achieved (losses on up to 1024 calibration samples)."""

    name: str
    loss_nearest: float
    loss_adaround: float
    flipped: float  # share of weights rounded differently from nearest
    iters: int
    seconds: float


@torch.no_grad()
def layer_loss(
    qlayer: QuantLayer,
    weight: Tensor,
    x: Tensor,
    target: Tensor,
    activation: Callable[[Tensor], Tensor] | None,
    chunk: int = 256,
) -> float:
    """Reconstruction loss of `weight` on (x, target), same normalisation as training."""
    total, count = 0.0, 0
    for xs, ts in zip(x.split(chunk), target.split(chunk)):
        out = apply_layer(qlayer.layer, xs, weight)
        if activation is not None:
            out = activation(out)
        total += reconstruction_loss(out, ts, qlayer.channel_dim).item() * xs.shape[0]
        count += xs.shape[0]
    return total / max(count, 1)


def fast_layout(t: Tensor) -> Tensor:
    """Channels-last for image batches: CPU convolutions and their weight gradients run 1.3-5x
    faster on it (measured on ResNet-20 and EfficientNet-Lite0 layers), with identical math."""
    if t.dim() == 4 and t.device.type == "cpu":
        return t.contiguous(memory_format=torch.channels_last)
    return t


def optimise_rounding(
    qlayer: QuantLayer,
    x: Tensor,
    target: Tensor,
    activation: Callable[[Tensor], Tensor] | None,
    cfg: QuantConfig,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "",
) -> Tensor:
    """Learn V by Adam on reconstruction loss + lambda * f_reg; return the hard codes."""
    w = qlayer.layer.weight.detach()
    scale, zero_point = qlayer.scale, qlayer.zero_point
    w_floor = torch.floor(w / scale)
    v = torch.nn.Parameter(init_v(w / scale - w_floor))
    optimizer = torch.optim.Adam([v], lr=cfg.lr)
    x, target = fast_layout(x), fast_layout(target)
    n = x.shape[0]
    steps = tqdm(range(cfg.iters), desc=desc, leave=False, disable=not progress)
    for step in steps:
        idx = torch.randint(n, (min(cfg.batch_size, n),), generator=generator).to(x.device)
        h = rectified_sigmoid(v)
        weight = soft_weight(w_floor, h, scale, zero_point, qlayer.qmin, qlayer.qmax)
        out = apply_layer(qlayer.layer, x[idx], weight)
        if activation is not None:
            out = activation(out)
        loss = reconstruction_loss(out, target[idx], qlayer.channel_dim)
        beta = beta_at(step, cfg.iters, cfg.warm_start, cfg.beta_start, cfg.beta_end,
                       cfg.beta_decay)
        if beta is not None:
            loss = loss + cfg.reg_weight * round_regularizer(h, beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return hard_codes(w_floor, v.detach(), zero_point, qlayer.qmin, qlayer.qmax)


def adaround_layer(
    name: str,
    qlayer: QuantLayer,
    x: Tensor,
    target: Tensor,
    activation: Callable[[Tensor], Tensor] | None,
    cfg: QuantConfig,
    generator: torch.Generator,
    progress: bool = False,
    start: float | None = None,
) -> LayerResult:
    """Optimise the rounding of `qlayer`, store the hard codes, and report the gain.

    `start` (a perf_counter reading) lets the caller include its data collection in the time.
    """
    start = time.perf_counter() if start is None else start
    nearest = qlayer.nearest_codes()
    codes = optimise_rounding(qlayer, x, target, activation, cfg, generator, progress, name)
    qlayer.set_codes(codes)
    xs, ts = x[:EVAL_SAMPLES], target[:EVAL_SAMPLES]
    weight_nearest = dequantize(nearest, qlayer.scale, qlayer.zero_point)
    return LayerResult(
        name=name,
        loss_nearest=layer_loss(qlayer, weight_nearest, xs, ts, activation),
        loss_adaround=layer_loss(qlayer, qlayer.quantized_weight(), xs, ts, activation),
        flipped=(codes != nearest).float().mean().item(),
        iters=cfg.iters,
        seconds=time.perf_counter() - start,
    )
