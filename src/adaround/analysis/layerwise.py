"""All layers, each rounded on its own FP input (the paper's "all layers" column of Table 1).

Both methods minimise the same layer-wise objective, E[(dW x)^2] with x the layer's input in
the FP network (eq. 20): once as the local-MSE QUBO solved by annealing, once through the
continuous relaxation of the core (eq. 21, no activation). Each layer's input is collected once
and serves every bit width and both methods.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from adaround.analysis.config import AnalysisConfig
from adaround.analysis.grid import RoundingGrid
from adaround.analysis.qubo import input_second_moments, local_mse_qubo
from adaround.analysis.solvers import anneal
from adaround.errors import ModelError
from adaround.nn.quant_layer import QuantLayer
from adaround.prepare import LayerPlan, swap_in_quant_layers
from adaround.reconstruct.cache import layer_inputs as cached_layer_inputs
from adaround.reconstruct.loop import optimise_rounding

log = logging.getLogger(__name__)

LAYERWISE_METHODS = ("nearest", "qubo_local", "relaxation")


@torch.no_grad()
def layer_inputs(model: nn.Module, name: str, x: Tensor, batch_size: int = 128) -> Tensor:
    """The input of layer `name` for every sample of x (each pass stops at the layer)."""
    try:
        return cached_layer_inputs(model, model.get_submodule(name), list(x.split(batch_size)))
    except RuntimeError as exc:  # torch.cat of nothing: the layer never ran
        raise ModelError(f"layer {name} was not called in the forward pass") from exc


@torch.no_grad()
def layer_outputs(layer: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    return torch.cat([layer(xs) for xs in x.split(batch_size)])


def _qlayer(model: nn.Module, name: str) -> QuantLayer:
    q = model if not name else model.get_submodule(name)
    assert isinstance(q, QuantLayer)
    return q


def quantize_layerwise(fp: nn.Module, plans: list[LayerPlan], x: Tensor, cfg: AnalysisConfig,
                       generator: torch.Generator) -> dict[int, dict[str, nn.Module]]:
    """{bits: {method: quantized model}} for nearest, local-MSE QUBO and relaxation."""
    iters = cfg.all_layers_iters or cfg.iters
    models = {}
    for bits in cfg.bits:
        # the plans carry a bit width of their own: every layer at `bits` here
        at_bits = [LayerPlan(p.name, bits, p.info) for p in plans]
        models[bits] = {m: swap_in_quant_layers(copy.deepcopy(fp), at_bits,
                                                cfg.quant_config(bits))
                        for m in LAYERWISE_METHODS}
    for plan in plans:
        per_bits = {b: {m: _qlayer(models[b][m], plan.name) for m in LAYERWISE_METHODS}
                    for b in cfg.bits}
        for layers in per_bits.values():
            for q in layers.values():
                q.set_codes(q.nearest_codes())
        if not plan.reconstructable:
            continue
        layer = fp.get_submodule(plan.name)
        x_in = layer_inputs(fp, plan.name, x)
        try:
            moments = input_second_moments(layer, x_in)
        except ModelError as exc:
            log.warning("%s: %s; its local-MSE QUBO rounding stays nearest", plan.name, exc)
            moments = None
        target = layer_outputs(layer, x_in)
        for bits, layers in per_bits.items():
            if moments is not None:
                q = layers["qubo_local"]
                grid = RoundingGrid.of(q)
                qubo = local_mse_qubo(moments, grid, cfg.max_dense)
                up = anneal(qubo, grid.nearest().reshape(qubo.rows, -1), cfg.all_layers_sweeps,
                            generator)
                q.set_codes(grid.codes(up.reshape(grid.weight.shape).to(grid.weight.device)))
            q = layers["relaxation"]
            q.set_codes(optimise_rounding(q, x_in, target, None,
                                          cfg.quant_config(bits, iters), generator))
        log.info("all layers: %s rounded (%d bit widths)", plan.name, len(cfg.bits))
        del x_in, target
    return models
