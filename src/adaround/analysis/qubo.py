"""Rounding as a quadratic unconstrained binary optimisation (paper, section 3).

With the weight error e = d0 + step * b affine in the up/down choice b, every objective of the
paper is a quadratic form of e, hence a QUBO in b:

* task loss (eq. 13): E[dL] ~ 1/2 e^T H e, H the Hessian of the task loss w.r.t. the layer's
  weights (one dense n x n matrix for the whole layer);
* local MSE (eq. 20): E[(dW x)^2] = sum_k e_k^T E[x x^T] e_k, one small QUBO per output row k
  sharing the input second moments (per group for grouped convolutions).

Both are a :class:`Qubo`: independent rows, each f_r(b_r) = factor * e_r^T K_r e_r.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adaround.analysis.grid import RoundingGrid
from adaround.errors import ModelError
from adaround.nn.quant_layer import _CONV, _CONV_T

log = logging.getLogger(__name__)

MAX_DENSE = 4096  # variables of one dense QUBO block: 4096^2 float64 = 128 MiB


@dataclass(frozen=True)
class Qubo:
    """f(b) = factor * sum_r e_r^T K_r e_r with e_r = offset_r + step_r * b_r, b_r in {0,1}^m.

    `kernel` is [1, m, m] (shared by all rows) or [R, m, m]; `offset` and `step` are [R, m].
    Choices are passed shaped like the layer's weight (or [R, m]), with an optional leading
    sample dimension for :meth:`values`.

    Example:
        >>> q = Qubo(torch.eye(2)[None], torch.tensor([[-0.5, 0.3]]), torch.ones(1, 2))
        >>> float(q.value(torch.tensor([True, False])))  # e = (0.5, 0.3)
        0.34
    """

    kernel: Tensor
    offset: Tensor
    step: Tensor
    factor: float = 1.0

    @property
    def rows(self) -> int:
        return self.offset.shape[0]

    @property
    def size(self) -> int:
        """Variables per row."""
        return self.offset.shape[1]

    def _as_rows(self, choices: Tensor) -> Tensor:
        return choices.reshape(-1, self.rows, self.size).to(self.offset.dtype)

    def field(self, errors: Tensor) -> Tensor:
        """K_r e_r for errors [k, R, m]."""
        if self.kernel.shape[0] == 1:
            return errors @ self.kernel[0]
        return torch.einsum("krm,rmn->krn", errors, self.kernel)

    def row_values(self, choices: Tensor) -> Tensor:
        """[k, R]: each row's value for k choices."""
        errors = self.offset + self.step * self._as_rows(choices)
        return self.factor * (errors * self.field(errors)).sum(-1)

    def values(self, choices: Tensor) -> Tensor:
        """[k]: the objective of k choices given as [k, *weight_shape] or [k, R, m]."""
        return self.row_values(choices).sum(-1)

    def value(self, choice: Tensor) -> Tensor:
        """The objective of one choice (a 0-dim tensor)."""
        return self.values(choice.unsqueeze(0))[0]

    def matrix(self) -> tuple[Tensor, Tensor]:
        """(Q [R, m, m], c [R]): the standard form f(b) = sum_r b_r^T Q_r b_r + c_r.

        The linear terms sit on the diagonal (b_i^2 = b_i for binary b).
        """
        kernel = self.kernel.expand(self.rows, -1, -1)
        linear = 2.0 * self.step * torch.einsum("rmn,rn->rm", kernel, self.offset)
        quad = self.step[:, :, None] * kernel * self.step[:, None, :]
        q = self.factor * (quad + torch.diag_embed(linear))
        c = self.factor * torch.einsum("rm,rmn,rn->r", self.offset, kernel, self.offset)
        return q, c


def check_dense(name: str, variables: int, max_dense: int = MAX_DENSE) -> None:
    """Refuse QUBO blocks whose dense matrix would not fit comfortably in memory."""
    if variables > max_dense:
        gib = variables**2 * 8 / 2**30
        raise ModelError(
            f"{name} needs a dense {variables} x {variables} QUBO matrix ({gib:.1f} GiB in "
            f"float64), above the limit of {max_dense} variables: analyse a smaller layer (the "
            "first layer of a CNN has a few hundred weights) or raise max_dense"
        )


def qubo_from_hessian(hessian: Tensor, grid: RoundingGrid, factor: float = 0.5) -> Qubo:
    """Task-loss QUBO: 1/2 e^T H e over all the layer's weights (eq. 13).

    With the factor 1/2 its value estimates the increase of the task loss caused by rounding
    (second-order Taylor expansion, gradient term dropped as in the paper).
    """
    n = grid.numel
    if hessian.shape != (n, n):
        raise ModelError(f"Hessian of shape {tuple(hessian.shape)} does not match a layer of "
                         f"{n} weights")
    d0, step = grid.offsets()
    return Qubo(hessian.to(torch.float64)[None], d0.reshape(1, n).double(),
                step.reshape(1, n).double(), factor)


def _patch_probe(layer: nn.Module) -> nn.Module:
    """A copy of the conv whose output channel g * m + j is element j of group g's patch.

    Running the layer's own forward keeps its padding (also custom "same" padding); keeping
    its groups keeps the probe small for depthwise layers.
    """
    probe = copy.deepcopy(layer)  # never change the caller's layer
    m = layer.weight[0].numel()
    eye = torch.eye(m, dtype=layer.weight.dtype, device=layer.weight.device)
    eye = eye.reshape(m, *layer.weight.shape[1:])
    eye = eye.repeat(layer.groups, *([1] * (eye.dim() - 1)))
    probe.weight = nn.Parameter(eye, requires_grad=False)
    probe.bias = None
    probe.out_channels = m * layer.groups
    return probe


@torch.no_grad()
def input_second_moments(layer: nn.Module, x: Tensor, chunk: int = 32) -> Tensor:
    """E[x x^T] over samples and output positions of the layer's input patches: [G, m, m].

    m is the number of weights of one output row (in_channels / groups * kernel size) and G the
    number of groups (1 for Linear and ordinary convolutions). Padding counts as zeros, as in
    the layer's own output.
    """
    if isinstance(layer, _CONV_T):
        raise ModelError(
            f"the local-MSE QUBO needs each output to be a weight row times an input patch; "
            f"{type(layer).__name__} is not: analyse a Conv or Linear layer"
        )
    if isinstance(layer, nn.Linear):
        flat = x.reshape(-1, x.shape[-1]).double()
        return (flat.T @ flat / flat.shape[0])[None]
    if not isinstance(layer, _CONV):
        raise ModelError(f"cannot build the local-MSE QUBO of a {type(layer).__name__}")
    groups = layer.groups
    m = layer.weight[0].numel()
    probe = _patch_probe(layer)
    total = torch.zeros(groups, m, m, dtype=torch.float64, device=x.device)
    count = 0
    for xs in x.split(chunk):
        # products in the input's dtype (float64 sums only across chunks): 2x faster in float32
        p = probe(xs).flatten(2)  # [B, G * m, L]
        p = p.reshape(p.shape[0], groups, m, -1).permute(1, 2, 0, 3).reshape(groups, m, -1)
        total += (p @ p.transpose(1, 2)).double()
        count += p.shape[2]
    return total / count


def local_mse_qubo(moments: Tensor, grid: RoundingGrid,
                   max_dense: int = MAX_DENSE) -> Qubo:
    """Local MSE QUBO (eq. 20): sum_k E[(dW_k x)^2], its value the layer's output MSE.

    The value equals the pre-activation reconstruction loss of the core (squared error summed
    over output channels, averaged over samples and positions) on the data of `moments`.
    """
    rows = grid.weight.shape[0]
    m = grid.numel // rows
    groups = moments.shape[0]
    if moments.shape[1:] != (m, m) or rows % groups:
        raise ModelError(f"second moments of shape {tuple(moments.shape)} do not match a weight "
                         f"of shape {tuple(grid.weight.shape)}")
    check_dense("one output row of the layer", m, max_dense)
    kernel = moments if groups in (1, rows) else moments.repeat_interleave(rows // groups, 0)
    d0, step = grid.offsets()
    return Qubo(kernel.double(), d0.reshape(rows, m).double(), step.reshape(rows, m).double())
