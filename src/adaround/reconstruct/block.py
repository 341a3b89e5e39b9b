"""One reconstruction loop for every unit: a block of layers (BRECQ) or a layer alone.

For a unit, V of every layer in it (and, with learn_act_scale, the step of every activation
quantizer in it) are optimised by Adam on

    || f(W~, x^) - f(W, x) ||^2 (optionally Fisher-weighted) + lambda * sum_layers f_reg(V)

on random batches of the cached unit input x^ (from the network whose earlier units are already
quantized) against the FP unit output, with autograd through the unit's own forward code. With
QDrop each activation quantizer in the unit keeps an element quantized with probability p and
in float otherwise, at every step. With compile=True the quantizers' element-wise passes are
fused by torch.compile (the larger part of a step on 112x112 activations). A single layer with
fixed activation steps and no QDrop gets exactly the paper's AdaRound (the same codes as
reconstruct/loop.py, tested).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from adaround.blocks import Unit
from adaround.config import QuantConfig
from adaround.errors import ConfigError
from adaround.nn.act_quant import ActQuant
from adaround.nn.quant_layer import QuantLayer
from adaround.primitives import (
    beta_at,
    dequantize,
    hard_codes,
    init_v,
    rectified_sigmoid,
    round_regularizer,
    soft_weight,
)
from adaround.reconstruct.block_data import UnitInputs, first_tensor
from adaround.reconstruct.loop import EarlyStop

if TYPE_CHECKING:
    from adaround.distributed_units import BatchSplit

EVAL_SAMPLES = 1024
EVAL_CHUNK = 256


@dataclass(frozen=True)
class ActRange:
    """An activation quantizer of the unit: its grid, and its step before and after."""

    bits: int
    signed: bool
    scale_start: float
    scale_end: float

    def describe(self) -> str:
        lo = -(2 ** (self.bits - 1)) if self.signed else 0
        hi = 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1
        end = (f" -> [{lo * self.scale_end:.3g}, {hi * self.scale_end:.3g}]"
               if self.scale_end != self.scale_start else "")
        return (f"A{self.bits}{'s' if self.signed else 'u'} "
                f"[{lo * self.scale_start:.3g}, {hi * self.scale_start:.3g}]{end}")


@dataclass(frozen=True)
class BlockResult:
    """What one unit's reconstruction achieved (losses on up to 1024 calibration samples)."""

    name: str
    kind: str  # "block" or "layer"
    layers: tuple[str, ...]
    loss_nearest: float
    loss_adaround: float
    flipped: float  # share of the unit's weights rounded differently from nearest
    iters: int
    seconds: float
    step_seconds: float  # of `seconds`, the optimisation steps (the rest: data and losses)
    act_ranges: dict[str, ActRange] = field(default_factory=dict)  # by layer name in the model


class _Rounding:
    """V of one layer of the unit, and its relaxed and hard weights."""

    def __init__(self, key: str, qlayer: QuantLayer) -> None:
        w = qlayer.layer.weight.detach()
        self.key, self.qlayer = key, qlayer
        w_scaled = w / qlayer.weight_scale()
        self.w_floor = torch.floor(w_scaled)
        self.v = init_v(w_scaled - self.w_floor).requires_grad_(True)

    def soft(self, h: Tensor) -> Tensor:
        q = self.qlayer
        return soft_weight(self.w_floor, h, q.weight_scale(), q.weight_zero_point(), q.qmin, q.qmax)

    def hard(self) -> Tensor:
        q = self.qlayer
        return hard_codes(self.w_floor, self.v.detach(), q.weight_zero_point(), q.qmin, q.qmax)


class UnitObjective:
    """The unit's output error on cached (x^, FP output) pairs."""

    def __init__(self, qunit: nn.Module, inputs: UnitInputs, target: Tensor,
                 activation: Callable[[Tensor], Tensor] | None, channel_dim: int,
                 weights: Tensor | None) -> None:
        self.qunit, self.inputs, self.target = qunit, inputs, target.detach()
        self.activation, self.channel_dim, self.weights = activation, channel_dim, weights

    def loss(self, params: dict[str, Tensor], idx: Tensor | slice) -> Tensor:
        args, kwargs = self.inputs.select(idx)
        out = first_tensor(functional_call(self.qunit, params, args, kwargs))
        if self.activation is not None:
            out = self.activation(out)
        err = (out - self.target[idx]).pow(2)
        if self.weights is not None:
            err = err * self.weights[idx]
        return err.sum(dim=self.channel_dim).mean()

    @torch.no_grad()
    def evaluate(self, params: dict[str, Tensor], limit: int = EVAL_SAMPLES) -> float:
        count = min(self.inputs.count, limit)
        total = 0.0
        for start in range(0, count, EVAL_CHUNK):
            part = slice(start, min(start + EVAL_CHUNK, count))
            total += self.loss(params, part).item() * (part.stop - part.start)
        return total / max(count, 1)


def _act_quants(qunit: nn.Module, prefix: str) -> dict[str, ActQuant]:
    found = {}
    for name, m in qunit.named_modules():
        if isinstance(m, QuantLayer) and isinstance(m.act_quant, ActQuant):
            found[f"{prefix}.{name}" if name and prefix else name or prefix] = m.act_quant
    return found


@contextmanager
def _reconstructing(act_quants: list[ActQuant], cfg: QuantConfig,
                    generator: torch.Generator) -> Iterator[list[Tensor]]:
    """QDrop on and steps learnable for the duration; the quantizers' scales as parameters."""
    scales = [aq.scale for aq in act_quants] if cfg.learn_act_scale else []
    for aq in act_quants:
        aq.qdrop, aq.generator, aq.fused = cfg.qdrop, generator, cfg.compile
    for scale in scales:
        scale.requires_grad_(True)
    try:
        yield scales
    finally:
        for aq in act_quants:
            aq.qdrop, aq.generator, aq.fused, aq.rows = None, None, False, None
            aq.scale.requires_grad_(False)


@torch.no_grad()
def check_batch_first(objective: UnitObjective, act_quants: dict[str, ActQuant]) -> None:
    """QDrop split across processes draws the whole batch's mask and keeps the rows of this
    process's samples (nn.act_quant.qdrop_rows); that needs every quantized activation to
    grow with the batch, batch first. Two forward passes (of 1 and 2 copies of a sample) show
    it before any step; an activation that does not (a table shared by all samples, a
    sequence-first layout) is refused by name rather than drawn wrong."""
    sizes: dict[str, list[tuple[int, int]]] = {name: [] for name in act_quants}
    handles = [aq.register_forward_hook(
        lambda _m, _a, out, name=name: sizes[name].append((out.shape[0], out.numel())))
        for name, aq in act_quants.items()]
    try:
        for n in (1, 2):
            objective.loss({}, torch.zeros(n, dtype=torch.long, device=objective.target.device))
    finally:
        for handle in handles:
            handle.remove()
    for name, seen in sizes.items():
        calls = len(seen) // 2
        for (rows1, n1), (rows2, n2) in zip(seen[:calls], seen[calls:]):
            if rows2 != 2 * rows1 or n2 != 2 * n1:
                raise ConfigError(
                    f"QDrop across processes: the input of {name} does not grow with the batch "
                    f"along its first dimension ({rows1} rows for one sample, {rows2} for two): "
                    "its random mask cannot be split by samples; run QDrop in one process (or "
                    "without qdrop)")


def _optimise(roundings: list[_Rounding], act_quants: list[ActQuant],
              objective: UnitObjective, cfg: QuantConfig, generator: torch.Generator,
              progress: bool, desc: str, split: BatchSplit | None = None) -> int:
    """Adam on V (and the activation steps); returns the steps run. With `split` (in a
    process group), the batches hold global sample indices, each process computes the loss
    gradient on its part and the gradients are summed (adaround.distributed_units)."""
    with _reconstructing(act_quants, cfg, generator) as scales:
        if not roundings and not scales:
            return 0
        opt = torch.optim.Adam([r.v for r in roundings], lr=cfg.lr) if roundings else None
        act_opt = torch.optim.Adam(scales, lr=cfg.act_lr) if scales else None
        # BRECQ and QDrop anneal the step-size learning rate to 0 over the run
        act_sched = (torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, cfg.iters)
                     if act_opt is not None else None)
        stop = EarlyStop() if cfg.early_stop and roundings and not scales else None
        count = objective.inputs.count if split is None else split.total
        batch = min(cfg.batch_size, count)
        device = objective.target.device
        for step in tqdm(range(cfg.iters), desc=desc, leave=False, disable=not progress):
            idx = torch.randint(count, (batch,), generator=generator).to(device)
            hs = [rectified_sigmoid(r.v) for r in roundings]
            share = 1.0
            if split is not None:
                idx, share = split.batch_part(idx, batch, act_quants if cfg.qdrop else [])
            loss = objective.loss({r.key: r.soft(h) for r, h in zip(roundings, hs)}, idx)
            beta = beta_at(step, cfg.iters, cfg.warm_start, cfg.beta_start, cfg.beta_end,
                           cfg.beta_decay)
            reg = (cfg.reg_weight * sum(round_regularizer(h, beta) for h in hs)
                   if beta is not None and hs else None)
            for o in (opt, act_opt):
                if o is not None:
                    o.zero_grad(set_to_none=True)
            if split is not None:
                split.backward(loss, share, reg, [r.v for r in roundings] + scales)
            else:
                (loss if reg is None else loss + reg).backward()
            for o in (opt, act_opt, act_sched):
                if o is not None:
                    o.step()
            if beta is not None and stop is not None and stop.update(step, lambda hs=hs: torch.cat(
                    [((h > 0) & (h < 1)).reshape(-1) for h in hs])):
                return step + 1
        return cfg.iters


def _relative(unit: Unit, layer: str) -> str:
    """The key of `layer`'s float weight under the unit's module."""
    rest = layer[len(unit.name) + 1:] if layer != unit.name else ""
    return f"{rest}.layer.weight" if rest else "layer.weight"


def reconstruct_unit(unit: Unit, qmodel: nn.Module, inputs: UnitInputs, target: Tensor,
                     activation: Callable[[Tensor], Tensor] | None, weights: Tensor | None,
                     cfg: QuantConfig, generator: torch.Generator, progress: bool = False,
                     start: float | None = None, split: BatchSplit | None = None) -> BlockResult:
    """Optimise the rounding of the unit's layers (and its activation steps), store the hard
    codes, and report the unit's output loss with nearest and learned rounding."""
    start = time.perf_counter() if start is None else start
    qunit = qmodel.get_submodule(unit.name)
    qlayers = [qmodel.get_submodule(name) for name in unit.layers]
    roundings = [_Rounding(_relative(unit, n), q) for n, q in zip(unit.layers, qlayers)]
    act_quants = _act_quants(qunit, unit.name)
    scales_start = {n: float(aq.scale) for n, aq in act_quants.items()}
    nearest_codes = [q.nearest_codes() for q in qlayers]
    nearest = {r.key: dequantize(c, r.qlayer.weight_scale(), r.qlayer.weight_zero_point())
               for r, c in zip(roundings, nearest_codes)}
    objective = UnitObjective(qunit, inputs, target, activation, qlayers[-1].channel_dim, weights)
    evaluate = objective.evaluate if split is None else split.evaluator(objective)
    loss_nearest = evaluate(nearest)
    if split is not None and cfg.qdrop is not None and act_quants:
        check_batch_first(objective, act_quants)
    step_start = time.perf_counter()
    steps = _optimise(roundings, list(act_quants.values()), objective, cfg, generator, progress,
                      unit.name, split)
    step_seconds = time.perf_counter() - step_start
    flipped = total = 0
    for r, codes in zip(roundings, nearest_codes):
        hard = r.hard()
        flipped += int((hard != codes).sum())
        total += hard.numel()
        r.qlayer.set_codes(hard)
    return BlockResult(
        name=unit.name, kind=unit.kind, layers=unit.layers, loss_nearest=loss_nearest,
        loss_adaround=evaluate({}), flipped=flipped / max(total, 1), iters=steps,
        seconds=time.perf_counter() - start, step_seconds=step_seconds,
        act_ranges={n: ActRange(aq.bits, aq.signed, scales_start[n], float(aq.scale))
                    for n, aq in act_quants.items()},
    )
