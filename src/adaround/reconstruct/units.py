"""Reconstruct a network unit after unit (blocks and the layers outside them), in execution
order: capture the unit's data, optimise, harden, free the data.

The data come from the FP and the quantized network advanced together through the traced
graph (blocks kept whole), so the calibration costs one pass of each network, not one per
unit; networks torch.fx cannot trace are re-run from their input for every unit."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from adaround.blocks import Unit, discover_blocks, named_blocks, plan_units
from adaround.checkpoint import Checkpoint
from adaround.config import QuantConfig
from adaround.guards import check_finite, check_result
from adaround.prepare import LayerPlan
from adaround.reconstruct.block import BlockResult, reconstruct_unit
from adaround.reconstruct.block_data import fisher_weights
from adaround.reconstruct.spill import budget_store
from adaround.reconstruct.stream import make_engine
from adaround.trace import LayerInfo, Trace

log = logging.getLogger(__name__)

FORWARD_BATCH = 128


def units_of(fp: nn.Module, trace: Trace, plans: list[LayerPlan], x: Tensor,
             cfg: QuantConfig) -> list[Unit]:
    """The units cfg asks for: blocks (found or named) and single layers, in execution order."""
    blocks: list[str] = []
    if cfg.unit == "block":
        blocks = named_blocks(fp, cfg.blocks) if cfg.blocks else discover_blocks(fp, x)
    quantized = {p.name for p in plans if p.reconstructable}
    return plan_units(blocks, trace.names(), quantized)


def _describe(result: BlockResult, cfg: QuantConfig, bits: dict[str, int]) -> str:
    layers = ", ".join(n.rpartition(".")[2] if result.kind == "block" else n
                       for n in result.layers)
    weights = "/".join(f"W{b}" for b in sorted({bits[n] for n in result.layers}))
    acts = "; ".join(f"{n.rpartition('.')[2]} {r.describe()}" for n, r in result.act_ranges.items())
    head = (f"{result.name} (block of {len(result.layers)}: {layers}; {weights})"
            if result.kind == "block" else f"{result.name} ({weights})")
    return (f"{head}: loss nearest {result.loss_nearest:.4g} -> adaround "
            f"{result.loss_adaround:.4g}, {100 * result.flipped:.1f}% rounded differently, "
            f"{result.iters}/{cfg.iters} steps, {result.seconds:.1f}s "
            f"({result.step_seconds:.1f}s steps)"
            + (f"; activations {acts}" if acts else ""))


def unit_activation(unit: Unit, info: LayerInfo | None,
                    cfg: QuantConfig) -> Callable[[Tensor], Tensor] | None:
    """The activation a unit's loss includes: a single layer's following one, if asked."""
    if unit.kind == "layer" and info is not None and cfg.loss_after_activation:
        return info.activation
    return None


def round_units(fp: nn.Module, qmodel: nn.Module, trace: Trace, plans: list[LayerPlan],
                x: Tensor, cfg: QuantConfig, progress: bool = False,
                checkpoint: Checkpoint | None = None) -> list[BlockResult]:
    """Reconstruct every unit; layers that cannot be reconstructed are rounded to nearest."""
    for plan in plans:
        if not plan.reconstructable:
            qlayer = qmodel.get_submodule(plan.name)
            qlayer.set_codes(qlayer.nearest_codes())
    units = units_of(fp, trace, plans, x, cfg)
    blocks = [u for u in units if u.kind == "block"]
    log.info("%d units: %d blocks (%s), %d single layers", len(units), len(blocks),
             ", ".join(u.name for u in blocks) or "-", len(units) - len(blocks))
    infos = {p.name: p.info for p in plans}
    bits = {p.name: p.bits for p in plans}
    chunks = list(x.split(FORWARD_BATCH))
    generator = torch.Generator().manual_seed(cfg.seed)
    checkpoint = checkpoint or Checkpoint(None, fp, x, cfg)
    report: list[BlockResult] = checkpoint.restore(qmodel, generator)
    with budget_store(cfg.memory_budget_mb) as store:
        engine = make_engine(fp, qmodel, chunks, [u.name for u in units], store,
                             blocks=frozenset(u.name for u in blocks))
        for unit in tqdm(units, desc="units", unit="unit", disable=not progress):
            if unit.name in checkpoint.done:
                continue
            start = time.perf_counter()
            activation = unit_activation(unit, infos.get(unit.name), cfg)
            inputs = engine.unit_inputs(unit.name)
            target = engine.unit_target(unit.name, activation)
            check_finite(unit.name, "FP outputs (targets)", target)
            weights = fisher_weights(fp, unit.name, chunks) if cfg.fisher else None
            result = reconstruct_unit(unit, qmodel, inputs, target, activation, weights, cfg,
                                      generator, progress, start)
            del inputs, target, weights
            check_result(unit.name, result.loss_nearest, result.loss_adaround)
            report.append(result)
            checkpoint.record([unit.name], qmodel, generator, report)
            log.info("%s", _describe(result, cfg, bits))
    return report
