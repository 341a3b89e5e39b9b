"""Independent layers reconstructed together: `inputs="float"` (the paper's symmetric setting).

When every layer's input comes from the FP network, no layer depends on another's rounding,
so layers of the same shape can share one optimisation loop: their V, grids and moments are
stacked, and each step is one batched matmul and one set of element-wise kernels for all of
them instead of one per layer. The math per layer is unchanged (x^ = x, so the quadratic loss
is dw^T A dw): a stack gives each layer the codes it gets alone (tested).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adaround.config import QuantConfig
from adaround.nn.quant_layer import QuantLayer
from adaround.primitives import dequantize
from adaround.reconstruct.loop import (
    LayerResult,
    Objective,
    moment_loss,
    quadratic_gradient,
    round_weights,
)
from adaround.reconstruct.quadratic import Moments, weight_rows


class StackedQuadraticLoss:
    """The quadratic losses of several same-shaped layers; weights come stacked [L, ...]."""

    def __init__(self, qlayers: Sequence[QuantLayer], moments: Sequence[Moments]) -> None:
        rows = [weight_rows(q.layer, q.layer.weight.detach()) for q in qlayers]
        self.w = torch.cat(rows)  # [L * groups, C_out / groups, d]
        self.a = torch.cat([m.a for m in moments])
        self.r = torch.cat([m.r for m in moments])

    def gradient_at(self, w0: Tensor, precision: str = "float32",
                    threads: int = 1) -> Callable[[Tensor], Tensor]:
        """As QuadraticLoss.gradient_at, for the stack."""
        return quadratic_gradient(self.a, self.r, w0.reshape(self.w.shape) - self.w,
                                  lambda hs: hs.reshape(self.w.shape), precision=precision,
                                  threads=threads)

    def skip(self, steps: int) -> None:
        pass


def stack_key(qlayer: QuantLayer) -> tuple[object, ...]:
    """Layers with equal keys can share a loop: same weight shape, grouping and grid range."""
    weight = qlayer.layer.weight
    return (tuple(weight.shape), getattr(qlayer.layer, "groups", 1), qlayer.qmin, qlayer.qmax,
            weight.dtype, weight.device)


def round_stacked(named: Sequence[tuple[str, QuantLayer, Moments]], cfg: QuantConfig,
                  progress: bool = False) -> list[LayerResult]:
    """Round every layer of `named`, same-shaped layers in one loop; store their codes."""
    stacks: dict[tuple[object, ...], list[tuple[str, QuantLayer, Moments]]] = defaultdict(list)
    for item in named:
        stacks[stack_key(item[1])].append(item)
    results: dict[str, LayerResult] = {}
    for members in stacks.values():
        start = time.perf_counter()
        qlayers = [q for _, q, _ in members]
        objective = Objective(StackedQuadraticLoss(qlayers, [m for _, _, m in members]))
        codes, steps_run = round_weights(
            torch.stack([q.layer.weight.detach() for q in qlayers]),
            torch.stack([q.weight_scale() for q in qlayers]),
            torch.stack([q.weight_zero_point() for q in qlayers]),
            qlayers[0].qmin, qlayers[0].qmax, objective, cfg, progress,
            f"{len(members)} x {members[0][0]}")
        seconds = (time.perf_counter() - start) / len(members)
        for (name, qlayer, moments), layer_codes in zip(members, codes):
            nearest = qlayer.nearest_codes()
            qlayer.set_codes(layer_codes)
            weight_nearest = dequantize(nearest, qlayer.weight_scale(), qlayer.weight_zero_point())
            results[name] = LayerResult(
                name=name, loss_nearest=moment_loss(qlayer, moments, weight_nearest),
                loss_adaround=moment_loss(qlayer, moments, qlayer.quantized_weight()),
                flipped=(layer_codes != nearest).float().mean().item(), iters=steps_run,
                seconds=seconds, objective="quadratic", step_seconds=seconds,
                measured="quadratic loss, layer output",
                batched=len(members))
    return [results[name] for name, _, _ in named]
