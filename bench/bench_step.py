"""Where a layer's time goes, by layer shape, against its arithmetic: the rounding step and the
moments of the quadratic loss.

    python bench/bench_step.py --threads 1 --json bench/results/bench_step.jsonl

Steps: the time of one step of the rounding loop (`run_rounding`, quadratic loss) beside the
time of its one matrix product alone (the [C_out, d] x [d, d] product, the arithmetic floor of
a step) and that product's flops: the rest is the element-wise chain and launches.
Moments: `accumulate_moments` on 256 samples of the layer's input (the CIFAR ResNets' and
EfficientNet-Lite0's activation sizes) against its multiply-adds (the Gram matrix's lower
triangle, the r product, the layer's convolution on x^ - x) as a share of this machine's
matmul rate, and with `keep` = 1/4 (moment_positions' subsample). Same-shaped layers stepped
together (inputs="float") are timed as one loop against one loop each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import _best  # noqa: E402

from adaround import QuantConfig
from adaround.nn.quant_layer import QuantLayer
from adaround.reconstruct.batched import round_stacked
from adaround.reconstruct.loop import Objective, QuadraticLoss, run_rounding
from adaround.reconstruct.quadratic import accumulate_moments, patches, subsample_step

SHAPES = [  # (name, C_in, C_out, kernel, spatial)
    ("resnet20 layer1 3x3", 16, 16, 3, 32), ("resnet20 layer2 3x3", 32, 32, 3, 16),
    ("resnet20 layer3 3x3", 64, 64, 3, 8),
    ("effnet expand 1x1", 112, 672, 1, 14), ("effnet project 1x1", 1152, 192, 1, 7),
    ("effnet head 1280x1000", 1280, 1000, 1, 1),
]


def _layer(c_in: int, c_out: int, k: int, hw: int, n: int = 32) -> tuple[QuantLayer, object,
                                                                          torch.Tensor]:
    layer = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    qlayer = QuantLayer(layer, 4, True, True)
    qlayer.fit_grid("mse")
    x = torch.randn(n, c_in, hw, hw)
    return qlayer, accumulate_moments(layer, [(x + 0.05 * torch.randn_like(x), x)]), x


def step_rows(iters: int) -> list[dict]:
    rows = []
    print("| layer | weights | ms/step | matmul alone ms | matmul GFLOP/s | matmul share of "
          "the step |\n|---|---|---|---|---|---|")
    cfg = QuantConfig(iters=iters, early_stop=False)
    for name, *shape in SHAPES:
        qlayer, moments, _ = _layer(*shape)
        step = _best(lambda: run_rounding(qlayer, Objective(QuadraticLoss(qlayer, moments)),  # noqa: B023
                                          cfg), 2) / iters
        a, r = moments.a, moments.r  # type: ignore[attr-defined]
        dw, out = torch.randn_like(r), torch.empty_like(r)
        matmul = _best(lambda: [torch.baddbmm(r, dw, a, out=out) for _ in range(iters)], 2) / iters  # noqa: B023
        flops = 2 * r.numel() * a.shape[-1]
        rows.append({"layer": name, "weights": qlayer.layer.weight.numel(), "step_ms": 1e3 * step,
                     "matmul_ms": 1e3 * matmul, "matmul_gflops": flops / matmul / 1e9,
                     "flops": flops})
        print(f"| {name} | {qlayer.layer.weight.numel()} | {1e3 * step:.3f} | "
              f"{1e3 * matmul:.3f} | {flops / matmul / 1e9:.0f} | {100 * matmul / step:.0f} % |")
    return rows


def peak_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    seconds = _best(lambda: [a @ b for _ in range(5)], 2) / 5
    return 2 * 2048**3 / seconds / 1e9


def moment_rows(samples: int, peak: float) -> list[dict]:
    rows = []
    print(f"\nmoments of {samples} samples (matmul peak {peak:.0f} GFLOP/s)\n"
          "| layer | positions | d | s | GFLOP | share of peak | s, keep 1/4 |\n"
          "|---|---|---|---|---|---|---|")
    for name, c_in, c_out, k, hw in SHAPES:
        layer = nn.Conv2d(c_in, c_out, k, padding=k // 2)
        x = torch.randn(samples, c_in, hw, hw)
        x_q = x + 0.05 * torch.randn_like(x)
        full = _best(lambda: accumulate_moments(layer, [(x_q, x)]), 2)  # noqa: B023
        part = _best(lambda: accumulate_moments(layer, [(x_q, x)], keep=0.25), 2)  # noqa: B023
        positions = patches(layer, x[:1]).shape[1] * samples
        d = c_in * k * k
        # Gram lower triangle (5/8 of d^2 for 4x4 blocks, 3/4 for 2x2), r, the conv on e
        share = 5 / 8 if d >= 256 else 3 / 4 if d >= 32 else 1
        flops = 2 * positions * (share * d * d + 2 * c_out * d)
        rows.append({"layer": name, "positions": positions, "d": d, "seconds": full,
                     "gflop": flops / 1e9, "peak_share": flops / full / 1e9 / peak,
                     "seconds_keep_quarter": part, "every": subsample_step(0.25)})
        print(f"| {name} | {positions} | {d} | {full:.3f} | {flops / 1e9:.1f} | "
              f"{100 * flops / full / 1e9 / peak:.0f} % | {part:.3f} |")
    return rows


def stacking_rows(iters: int) -> dict:
    """One loop per layer against one stacked loop (inputs="float"), six same-shaped layers."""
    import adaround.reconstruct.batched as batched

    stacking = {}
    for c, hw in [(16, 32), (64, 8)]:
        stack = [_layer(c, c, 3, hw)[:2] for _ in range(6)]
        cfg = QuantConfig(iters=iters, early_stop=False, inputs="float")
        times = []
        for key in (id, batched.stack_key):
            original, batched.stack_key = batched.stack_key, key  # type: ignore[assignment]
            start = time.perf_counter()
            round_stacked([(f"l{i}", q, m) for i, (q, m) in enumerate(stack)], cfg)  # type: ignore[misc]
            times.append(1e3 * (time.perf_counter() - start) / iters)
            batched.stack_key = original
        stacking[f"{c}x{c}x3x3"] = times
        print(f"6 layers {c}x{c}x3x3: one loop each {times[0]:.2f} ms per step of all six, "
              f"one stacked loop {times[1]:.2f} ms")
    return stacking


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--samples", type=int, default=256, help="samples of the moments' inputs")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import os

    load = os.getloadavg()[0]
    steps = step_rows(args.iters)
    peak = peak_gflops()
    moments = moment_rows(args.samples, peak)
    print()
    stacking = stacking_rows(args.iters)
    print(f"\nload average (1 min) {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    if args.json:
        with args.json.open("a") as fh:
            fh.write(json.dumps({"threads": args.threads, "iters": args.iters,
                                 "samples": args.samples, "matmul_peak_gflops": peak,
                                 "load": [load, os.getloadavg()[0]], "steps": steps,
                                 "moments": moments, "stacking_ms": stacking,
                                 "torch": torch.__version__}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
