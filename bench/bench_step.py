"""Cost of one rounding step (quadratic loss) by layer shape: eager against torch.compile, and
the same layers one loop each against one stacked loop (inputs="float").

    python bench/bench_step.py --threads 1

Shapes are those of ResNet-20 (3x3 convs) and EfficientNet-Lite0 (1x1 expand/project convs,
the 1280 x 1000 head); eager and compiled runs alternate, twice, in one process, so machine
load hits both alike. The first compiled call (torch.compile's one-off cost) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from adaround import QuantConfig
from adaround.allocator import keep_freed_memory
from adaround.nn.quant_layer import QuantLayer
from adaround.reconstruct.batched import round_stacked
from adaround.reconstruct.loop import Objective, QuadraticLoss, run_rounding
from adaround.reconstruct.quadratic import accumulate_moments

SHAPES = [  # (name, C_in, C_out, kernel, spatial)
    ("resnet20 layer1 3x3", 16, 16, 3, 32), ("resnet20 layer3 3x3", 64, 64, 3, 8),
    ("effnet expand 1x1", 112, 672, 1, 14), ("effnet project 1x1", 1152, 192, 1, 7),
    ("effnet head 1280x1000", 1280, 1000, 1, 1),
]


def _layer(c_in: int, c_out: int, k: int, hw: int) -> tuple[QuantLayer, object]:
    layer = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    qlayer = QuantLayer(layer, 4, True, True)
    qlayer.fit_grid("mse")
    x = torch.randn(32, c_in, hw, hw)
    return qlayer, accumulate_moments(layer, [(x + 0.05 * torch.randn_like(x), x)])


def _ms_per_step(qlayer: QuantLayer, moments: object, iters: int, compiled: bool) -> float:
    cfg = QuantConfig(iters=iters, early_stop=False, compile=compiled)
    start = time.perf_counter()
    run_rounding(qlayer, Objective(QuadraticLoss(qlayer, moments)), cfg)  # type: ignore[arg-type]
    return 1e3 * (time.perf_counter() - start) / iters


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keep_freed_memory()
    layers = [(name, *_layer(*shape)) for name, *shape in SHAPES]
    start = time.perf_counter()
    for _, qlayer, moments in layers:
        _ms_per_step(qlayer, moments, 3, True)
    compile_s = time.perf_counter() - start
    rows = []
    print("| layer | weights | eager ms/step | compiled ms/step |\n|---|---|---|---|")
    for name, qlayer, moments in layers:
        eager = min(_ms_per_step(qlayer, moments, args.iters, False) for _ in range(2))
        fused = min(_ms_per_step(qlayer, moments, args.iters, True) for _ in range(2))
        rows.append({"layer": name, "weights": qlayer.layer.weight.numel(), "eager_ms": eager,
                     "compiled_ms": fused})
        print(f"| {name} | {qlayer.layer.weight.numel()} | {eager:.3f} | {fused:.3f} |")
    print(f"\ntorch.compile's first calls (compilation): {compile_s:.1f} s")
    # one loop per layer against one stacked loop (inputs="float"), six same-shaped layers
    import adaround.reconstruct.batched as batched

    stacking = {}
    for c, hw in [(16, 32), (64, 8)]:
        stack = [_layer(c, c, 3, hw) for _ in range(6)]
        cfg = QuantConfig(iters=args.iters, early_stop=False, inputs="float")
        times = []
        for key in (id, batched.stack_key):
            original, batched.stack_key = batched.stack_key, key  # type: ignore[assignment]
            start = time.perf_counter()
            round_stacked([(f"l{i}", q, m) for i, (q, m) in enumerate(stack)], cfg)  # type: ignore[misc]
            times.append(1e3 * (time.perf_counter() - start) / args.iters)
            batched.stack_key = original
        stacking[f"{c}x{c}x3x3"] = times
        print(f"6 layers {c}x{c}x3x3: one loop each {times[0]:.2f} ms per step of all six, "
              f"one stacked loop {times[1]:.2f} ms")
    if args.json:
        with args.json.open("a") as fh:
            fh.write(json.dumps({"threads": args.threads, "iters": args.iters,
                                 "compile_seconds": compile_s, "rows": rows,
                                 "stacking_ms": stacking}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
