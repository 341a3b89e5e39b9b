"""The AdaRound math as pure functions (paper, section 4).

    W~ = s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z)
    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)
    f_reg(V) = sum(1 - |2 h(V) - 1| ** beta)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ZETA = 1.1
GAMMA = -0.1
V_SPAN = math.log((1 - GAMMA) / (ZETA - 1))  # |V| where h(V) reaches 0 or 1: log 11 = 2.40


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid limits: signed [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1]."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quantize_nearest(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes of rounding to nearest (returned as float tensor holding integers)."""
    return torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (codes - zero_point) * scale


def fake_quantize(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    return dequantize(quantize_nearest(w, scale, zero_point, qmin, qmax), scale, zero_point)


def rectified_sigmoid(v: Tensor) -> Tensor:
    """h(V): a sigmoid stretched to (gamma, zeta) and clipped to [0, 1], so it reaches 0 and 1."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(fraction: Tensor) -> Tensor:
    """V0 such that h(V0) equals the fractional part of W / s (inverse of the rectified sigmoid)."""
    p = (fraction - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1.0 - p))


def soft_weight(
    w_floor: Tensor, h: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int
) -> Tensor:
    """The relaxed weight W~(V) used during optimisation."""
    return (torch.clamp(w_floor + h + zero_point, qmin, qmax) - zero_point) * scale


def hard_codes(w_floor: Tensor, v: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Final integer codes: round up where h(V) >= 0.5, down elsewhere."""
    up = (rectified_sigmoid(v) >= 0.5).to(w_floor.dtype)
    return torch.clamp(w_floor + up + zero_point, qmin, qmax)


def round_regularizer(h: Tensor, beta: float) -> Tensor:
    """f_reg: zero when every h is 0 or 1, largest at h = 0.5; low beta pushes harder."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(
    step: int,
    iters: int,
    warm_start: float,
    beta_start: float,
    beta_end: float,
    decay: str = "cosine",
) -> float | None:
    """Annealing temperature at `step`; None during the warm start (no regularisation)."""
    start = int(warm_start * iters)
    if step < start:
        return None
    progress = (step - start) / max(iters - start, 1)
    if decay == "linear":
        return beta_end + (beta_start - beta_end) * (1.0 - progress)
    return beta_end + 0.5 * (beta_start - beta_end) * (1.0 + math.cos(progress * math.pi))


def reconstruction_loss(output: Tensor, target: Tensor, channel_dim: int) -> Tensor:
    """Squared error summed over output channels and averaged over everything else.

    This normalisation is the one lambda = 0.01 was tuned for in the public implementations.
    """
    return (output - target).pow(2).sum(dim=channel_dim).mean()
