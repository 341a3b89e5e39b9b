"""Block reconstruction (BRECQ, QDrop, Fisher weights, learned activation steps) across the
processes of a group: the calibration data sharded as for layers (adaround.distributed), each
batch drawn as global sample indices on every process, its gradient computed on each
process's part and summed, so every process takes the 1-process step (up to the order of the
float sums). QDrop keeps each process's rows of the whole batch's masks; the Fisher weights
are normalised by all-reduced means.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from adaround.checkpoint import Checkpoint
from adaround.config import QuantConfig
from adaround.distributed import Shard, all_sum, rank, shard
from adaround.nn.act_quant import ActQuant, BatchRows
from adaround.reconstruct.loop import EVAL_SAMPLES
from adaround.reconstruct.spill import budget_store
from adaround.reconstruct.stream import make_engine

if TYPE_CHECKING:
    from adaround.prepare import LayerPlan

log = logging.getLogger(__name__)


class BatchSplit:
    """Block reconstruction across processes: every process draws the same batches of global
    sample indices, keeps those of its shard, and the gradients of the loss on them (weighted
    by their share of the batch) are summed over processes before the regulariser's gradient,
    the same everywhere, is added; so every process takes the same step."""

    def __init__(self, part: Shard) -> None:
        self.offset, self.count, self.total = part.offset, part.count, part.total

    def batch_part(self, idx: Tensor, batch: int, act_quants: list[ActQuant]
                   ) -> tuple[Tensor, float]:
        """(the batch's samples held here as shard indices, their share of the batch); with
        QDrop (`act_quants` given), each quantizer learns their positions in the batch, to
        keep its rows of the whole batch's mask. A process holding none of the batch still
        draws the masks (the random stream stays the 1-process one): it runs one sample of
        its shard, weighted 0."""
        local = idx - self.offset
        mine = (local >= 0) & (local < self.count)
        part, share = local[mine], float(mine.sum()) / batch
        if act_quants:
            positions = mine.nonzero().reshape(-1)
            if not len(part):
                part, positions = local[:1].clamp(0, self.count - 1), positions.new_zeros(1)
            for aq in act_quants:
                aq.rows = BatchRows(positions, batch)
        return part, share

    def backward(self, loss: Tensor, share: float, reg: Tensor | None,
                 params: list[Tensor]) -> None:
        """Fill every param's .grad: share * d loss (summed over processes) + d reg."""
        if share > 0:
            (loss * share).backward(retain_graph=reg is not None)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_sum(p.grad)
        if reg is not None:
            reg.backward()

    def evaluator(self, objective: Any) -> Callable[[dict[str, Tensor]], float]:
        """The unit's loss on the first EVAL_SAMPLES samples of all processes."""
        keep = max(0, min(self.count, EVAL_SAMPLES - self.offset))

        def evaluate(params: dict[str, Tensor]) -> float:
            local = objective.evaluate(params, keep) if keep else 0.0
            sums = all_sum(torch.tensor([local * keep, float(keep)], dtype=torch.float64,
                                        device=objective.target.device))
            return (sums[0] / sums[1].clamp(min=1)).item()

        return evaluate


def shared_mean(t: Tensor) -> Tensor:
    """The mean of `t`'s elements over all processes (float64 sums, all-reduced), in t's
    dtype: the Fisher weights are normalised over all data."""
    sums = torch.stack([t.double().sum(), t.new_tensor(t.numel(), dtype=torch.float64)])
    sums = all_sum(sums)
    return (sums[0] / sums[1]).to(t.dtype)


def round_units(fp: nn.Module, qmodel: nn.Module, trace: Any, plans: list[LayerPlan],
                x: Tensor, cfg: QuantConfig, progress: bool, checkpoint: Checkpoint
                ) -> list[Any]:
    """`adaround.reconstruct.units.round_units` across the processes of the group: data
    sharded, each batch's gradient summed over processes (QDrop: each process keeps its rows
    of the whole batch's masks; Fisher weights: normalised by all-reduced means); progress
    and logs from process 0, the checkpoint written by process 0 after each unit."""
    from adaround.reconstruct import units
    from adaround.reconstruct.block import reconstruct_unit
    from adaround.reconstruct.block_data import fisher_weights

    progress = progress and rank() == 0
    for plan in plans:
        if not plan.reconstructable:
            qlayer: Any = qmodel.get_submodule(plan.name)
            qlayer.set_codes(qlayer.nearest_codes())
    all_units = units.units_of(fp, trace, plans, x, cfg)
    blocks = [u for u in all_units if u.kind == "block"]
    infos = {p.name: p.info for p in plans}
    bits = {p.name: p.bits for p in plans}
    part = shard(list(x.split(units.FORWARD_BATCH)))
    split = BatchSplit(part)
    generator = torch.Generator().manual_seed(cfg.seed)
    report = checkpoint.restore(qmodel, generator)
    with budget_store(cfg.memory_budget_mb) as store:
        engine = make_engine(fp, qmodel, part.chunks, [u.name for u in all_units], store,
                             blocks=frozenset(u.name for u in blocks))
        for unit in tqdm(all_units, desc="units", unit="unit", disable=not progress):
            if unit.name in checkpoint.done:
                continue
            start = time.perf_counter()
            activation = units.unit_activation(unit, infos.get(unit.name), cfg)
            inputs = engine.unit_inputs(unit.name)
            target = engine.unit_target(unit.name, activation)
            weights = (fisher_weights(fp, unit.name, part.chunks, shared_mean) if cfg.fisher
                       else None)
            result = reconstruct_unit(unit, qmodel, inputs, target, activation, weights, cfg,
                                      generator, progress, start, split)
            del inputs, target, weights
            report.append(result)
            checkpoint.record([unit.name], qmodel, generator, report)
            if rank() == 0:
                log.info("%s", units._describe(result, cfg, bits))
    return report
