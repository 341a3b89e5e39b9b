"""Weight grids: the scale (and zero point) of a uniform integer grid, per tensor, per output
channel, or per group of `group_size` consecutive input weights of each output channel.

The default scale minimises ||W - round_to_nearest(W)||_F^2 over a grid of clipping ratios
(the paper's "weight MSE" grid); min-max uses the full range.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaround.primitives import fake_quantize, int_range

GRID_POINTS = 100


def channel_rows(w: Tensor, axis: int | None) -> Tensor:
    """View W as rows of one quantization group each: [C, K] per channel, [1, K] per tensor."""
    if axis is None:
        return w.reshape(1, -1)
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def group_rows(w: Tensor, group_size: int) -> Tensor:
    """View a [C_out, C_in] weight as rows of one group each: [C_out * C_in / group_size, g]."""
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size).reshape(-1, group_size)


def grid_shape(w: Tensor, axis: int | None, group_size: int | None = None) -> tuple[int, ...]:
    """Shape of the stored scale: broadcastable against W, or [C_out, C_in / g] for groups."""
    if group_size is not None:
        return (w.shape[0], w.shape[1] // group_size)
    return broadcast_shape(w, axis)


def expand_grid(param: Tensor, w: Tensor, group_size: int | None = None) -> Tensor:
    """A scale or zero point (as `grid_shape` stores it) expanded to W's shape."""
    if group_size is not None:
        return param.repeat_interleave(group_size, dim=1)
    return param.expand_as(w)


def broadcast_shape(w: Tensor, axis: int | None) -> tuple[int, ...]:
    """Shape of a scale tensor that broadcasts against W along `axis`."""
    if axis is None:
        return (1,) * w.dim()
    shape = [1] * w.dim()
    shape[axis] = w.shape[axis]
    return tuple(shape)


def _candidate(
    lo: Tensor, hi: Tensor, ratio: float, bits: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) * ratio / qmax
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) * ratio / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero_point = torch.clamp(torch.round(qmin - lo * ratio / scale), qmin, qmax)
    return scale, zero_point


def fit_grid(
    w: Tensor, bits: int, symmetric: bool, axis: int | None, method: str = "mse",
    group_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Scale and zero point (shaped as `grid_shape`) for a `bits`-bit grid.

    With `group_size`, W is [C_out, C_in] and each run of `group_size` input weights of an
    output channel gets its own grid, searched exactly as a channel's.

    Example:
        >>> s, z = fit_grid(torch.tensor([-1.0, 0.5, 1.0]), bits=2, symmetric=True, axis=None)
    """
    w32 = w.detach().float()
    rows = group_rows(w32, group_size) if group_size is not None else channel_rows(w32, axis)
    lo = torch.clamp(rows.min(dim=1).values, max=0.0)
    hi = torch.clamp(rows.max(dim=1).values, min=0.0)
    qmin, qmax = int_range(bits, symmetric)
    ratios = [1.0] if method == "minmax" else torch.linspace(1.0, 0.01, GRID_POINTS).tolist()
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zp = _candidate(lo, hi, 1.0, bits, symmetric)
    for ratio in ratios:
        scale, zero_point = _candidate(lo, hi, ratio, bits, symmetric)
        q = fake_quantize(rows, scale[:, None], zero_point[:, None], qmin, qmax)
        err = (q - rows).pow(2).sum(dim=1)
        if axis is None and group_size is None:
            err = err.sum(dim=0, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zero_point, best_zp)
    shape = grid_shape(w, axis, group_size)
    return best_scale.reshape(shape).to(w.dtype), best_zp.reshape(shape).to(w.dtype)
