"""A layer's rounding problem: every weight goes to the grid point below it or the one above.

A rounding *choice* is a boolean tensor shaped like the weight, True where the weight rounds up.
Everything the analysis compares (nearest, ceil, floor, stochastic samples, QUBO solutions, the
relaxation) is such a choice on one fixed grid, so they differ only in the rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adaround.nn.quant_layer import QuantLayer
from adaround.primitives import dequantize


@dataclass(frozen=True)
class RoundingGrid:
    """The weight of one layer and the integer grid it is rounded to.

    Example:
        >>> from torch import nn
        >>> q = QuantLayer(nn.Linear(4, 2), bits=4, symmetric=True, per_channel=False)
        >>> q.fit_grid("mse")
        >>> grid = RoundingGrid.of(q)
        >>> bool((grid.codes(grid.nearest()) == q.nearest_codes()).all())
        True
    """

    weight: Tensor
    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int

    @classmethod
    def of(cls, qlayer: QuantLayer) -> RoundingGrid:
        return cls(qlayer.layer.weight.detach(), qlayer.weight_scale(),
                   qlayer.weight_zero_point(), qlayer.qmin, qlayer.qmax)

    @property
    def numel(self) -> int:
        return self.weight.numel()

    def floor(self) -> Tensor:
        """floor(W / s): the grid index below each weight (before the zero point and clipping)."""
        return torch.floor(self.weight / self.scale)

    def fraction(self) -> Tensor:
        """W / s - floor(W / s) in [0, 1): the probability of rounding up stochastically."""
        ratio = self.weight / self.scale
        return ratio - torch.floor(ratio)

    def codes(self, up: Tensor) -> Tensor:
        """Integer codes of a choice (float tensor holding integers, clipped to the grid)."""
        return torch.clamp(self.floor() + up.to(self.weight.dtype) + self.zero_point,
                           self.qmin, self.qmax)

    def quantized(self, up: Tensor) -> Tensor:
        """The rounded weight of a choice."""
        return dequantize(self.codes(up), self.scale, self.zero_point)

    def offsets(self) -> tuple[Tensor, Tensor]:
        """(d0, step): the weight error is d0 + step * up, for every choice.

        step is the scale where rounding up moves the weight and 0 where clipping makes both
        choices land on the same code; so the error is affine in the choice.
        """
        down = self.quantized(torch.zeros_like(self.weight, dtype=torch.bool))
        up = self.quantized(torch.ones_like(self.weight, dtype=torch.bool))
        return down - self.weight, up - down

    def nearest(self) -> Tensor:
        """Round to nearest (ties as torch.round: to even), as the core's nearest_codes."""
        ratio = self.weight / self.scale
        return torch.round(ratio) > torch.floor(ratio)

    def ceil(self) -> Tensor:
        return torch.ones_like(self.weight, dtype=torch.bool)

    def floor_choice(self) -> Tensor:
        return torch.zeros_like(self.weight, dtype=torch.bool)

    def choice_of(self, codes: Tensor) -> Tensor:
        """The choice that gives `codes` (where clipping makes both equal: down)."""
        return (codes.to(self.weight.dtype) - self.zero_point - self.floor()) >= 1

    def stochastic(self, samples: int, generator: torch.Generator) -> Tensor:
        """`samples` choices [samples, *shape]: each weight up with probability its fraction."""
        frac = self.fraction()
        draws = torch.rand((samples, *frac.shape), generator=generator, dtype=frac.dtype)
        return draws.to(frac.device) < frac
