"""Whole layers per process: `inputs="float"` with the quadratic loss across processes.

With FP inputs no layer depends on another's rounding, and with the quadratic loss a layer's
objective is its moments alone, which every process holds once they are all-reduced. So the
layers need not be split by rows (whose steps, on layers of 16 or 32 channels, cost per-step
overhead, not flops): each process rounds whole stacks of same-shaped layers, the stacks one
process makes (`round_stacked`), with no communication during the steps; then one all-reduce
gathers every layer's codes and report. Whole stacks, not single layers: a stack stops early
when all its layers are final, so a stack cut in two could stop at other steps; whole, every
layer runs the steps it runs in one process (the same codes, bit for bit).

The owners are chosen the same way on every process (`assign`): stacks by decreasing step
cost, each to the process with the least cost so far.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaround.config import QuantConfig
from adaround.distributed import all_sum_each, rank, world
from adaround.nn.quant_layer import QuantLayer
from adaround.reconstruct.batched import round_stacked, stack_key
from adaround.reconstruct.loop import LayerResult
from adaround.reconstruct.quadratic import Moments

_STATS = ("loss_nearest", "loss_adaround", "flipped", "iters", "seconds", "step_seconds",
          "batched")


def step_cost(qlayer: QuantLayer) -> int:
    """Multiply-adds of one quadratic step: C_out x d^2 / groups."""
    weight = qlayer.layer.weight
    d = weight[0].numel()
    return weight.shape[0] * d * d // getattr(qlayer.layer, "groups", 1)


def assign(costs: Sequence[int], processes: int) -> list[int]:
    """The process each layer goes to: greedy by decreasing cost onto the least loaded one
    (ties: the lower index), the same on every process."""
    load = [0] * processes
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        p = min(range(processes), key=lambda p: (load[p], p))
        owner[i] = p
        load[p] += costs[i]
    return owner


def round_whole(named: Sequence[tuple[str, QuantLayer, Moments]], cfg: QuantConfig,
                progress: bool = False) -> list[LayerResult]:
    """Round each layer of `named` on the process `assign` gives it, then give every process
    every layer's codes and report line (in the order of `named`)."""
    if not named:
        return []
    keys = [stack_key(q) for _, q, _ in named]
    stacks = list(dict.fromkeys(keys))  # whole stacks: each keeps the steps it runs alone
    costs = [sum(step_cost(q) for (_, q, _), k in zip(named, keys) if k == key)
             for key in stacks]
    owner = [assign(costs, world())[stacks.index(k)] for k in keys]
    mine = [item for item, p in zip(named, owner) if p == rank()]
    results = {r.name: r for r in round_stacked(mine, cfg, progress)}
    device = named[0][1].codes.device
    codes = [q.codes if p == rank() else torch.zeros_like(q.codes)
             for (_, q, _), p in zip(named, owner)]
    stats = torch.zeros(len(named), len(_STATS), dtype=torch.float64, device=device)
    for i, (name, _, _) in enumerate(named):
        if name in results:
            stats[i] = torch.tensor([float(getattr(results[name], k)) for k in _STATS],
                                    dtype=torch.float64)
    *codes, stats = all_sum_each([*codes, stats])
    report = []
    for i, (name, qlayer, _) in enumerate(named):
        qlayer.set_codes(codes[i])
        values = dict(zip(_STATS, stats[i].tolist()))
        values["iters"], values["batched"] = int(values["iters"]), int(values["batched"])
        report.append(LayerResult(name=name, objective="quadratic",
                                  measured="quadratic loss, layer output", **values))
    return report
