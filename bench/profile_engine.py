"""Where the time of one `adaround.quantize` run goes, layer by layer.

Wraps the stages of the pipeline with timers (by name, so the same script profiles an older
checkout through --src): network passes and caching (`GraphEngine.layer_data`, the streams
advancing), moments of the quadratic loss, optimisation steps, and the per-layer loss report.
The steps are split further into matmul time at this machine's measured matmul throughput and
the rest (element-wise kernels, Python, op launches):

    python bench/profile_engine.py --model resnet20 --iters 2000 --threads 1
    python bench/profile_engine.py --src /tmp/before/src --loss sampled ...  # an old commit
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def _timed(owner: Any, name: str, stage: str, clock: dict, current: list[str]) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            clock[current[0]][stage] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["resnet20", "resnet56", "efficientnet_lite0"],
                   default="resnet20")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--grid", choices=["tensor", "channel"], default="tensor")
    p.add_argument("--num-calib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--loss", default=None, help="default: the library's default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--src", type=Path, help="profile the library under this src/ instead")
    p.add_argument("--json", type=Path, help="append the profile as one JSON line")
    args = p.parse_args()
    if args.src:
        sys.path.insert(0, str(args.src.resolve()))
    sys.path.insert(1, str(BENCH))
    import torch
    from bench_weights import load_cifar, load_effnet
    from speed import matmul_gflops

    import adaround
    import adaround.api as api
    from adaround.allocator import keep_freed_memory
    from adaround.reconstruct import loop, stream
    try:
        from adaround.reconstruct.quadratic import step_costs
    except ImportError:  # an older checkout: the same count from its own unfolding
        from adaround.reconstruct.quadratic import conv_input, patches

        def step_costs(layer: Any, x: Any, batch_size: int) -> tuple[int, int]:
            d, c_out = layer.weight[0].numel(), layer.weight.shape[0]
            positions = patches(layer, conv_input(layer, x[:1])).shape[1] if x.dim() > 2 else 1
            groups = getattr(layer, "groups", 1)
            return c_out * d * d // groups, 3 * batch_size * positions * c_out * d

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    if args.model == "efficientnet_lite0":
        model, calib, _, _ = load_effnet(args.num_calib, 0)
    else:
        model, calib, _, _ = load_cifar(args.model, args.num_calib, 0)
    clock: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    current = ["(setup)"]
    original_layer_data = stream.GraphEngine.layer_data

    def layer_data(self: Any, name: str, activation: Any) -> Any:
        current[0] = name
        start = time.perf_counter()
        try:
            return original_layer_data(self, name, activation)
        finally:
            clock[name]["network + cache"] += time.perf_counter() - start

    stream.GraphEngine.layer_data = layer_data
    if hasattr(api, "_layer_moments"):
        _timed(api, "_layer_moments", "moments", clock, current)
    _timed(loop, "run_rounding", "steps", clock, current)
    _timed(loop, "layer_loss", "loss report", clock, current)
    options = {"loss": args.loss} if args.loss else {}
    cfg = adaround.QuantConfig(weight_bits=args.bits, per_channel=args.grid == "channel",
                               iters=args.iters, **options)
    start = time.perf_counter()
    qmodel = adaround.quantize(model, calib, cfg)
    total = time.perf_counter() - start
    peak = matmul_gflops()
    from adaround.reconstruct.cache import layer_inputs

    rows, sums = [], defaultdict(float)
    for result in qmodel.adaround_report:
        layer = qmodel.get_submodule(result.name).layer
        x = layer_inputs(qmodel, qmodel.get_submodule(result.name), [calib[:2]])
        quadratic, sampled = step_costs(layer, x, cfg.batch_size)
        objective = getattr(result, "objective", "sampled")
        flops = 2 * (sampled if objective == "sampled" else quadratic) * result.iters
        stages = clock[result.name]
        matmul = flops / (peak * 1e9)
        row = {"layer": result.name, "objective": objective, **stages,
               "steps: matmul at peak": min(matmul, stages["steps"]),
               "steps: rest": max(stages["steps"] - matmul, 0.0),
               "ms/step": 1e3 * stages["steps"] / max(result.iters, 1), "total": result.seconds}
        rows.append(row)
        for key, value in row.items():
            if isinstance(value, float) and key != "ms/step":
                sums[key] += value
    keys = ["network + cache", "moments", "steps", "steps: matmul at peak", "steps: rest",
            "loss report"]
    print(f"| layer | loss | {' | '.join(keys)} | ms/step | total s |")
    print("|---" * (len(keys) + 4) + "|")
    for row in rows:
        print(f"| {row['layer']} | {row['objective']} | "
              + " | ".join(f"{row.get(k, 0.0):.2f}" for k in keys)
              + f" | {row['ms/step']:.3f} | {row['total']:.2f} |")
    print("| **all layers** | | " + " | ".join(f"**{sums[k]:.1f}**" for k in keys)
          + f" | | **{sums['total']:.1f}** |")
    other = total - sums["total"]
    print(f"\nwall {total:.1f} s: " + ", ".join(
        f"{k} {100 * sums[k] / total:.0f}%" for k in keys if k != "steps")
          + f", outside the layers (tracing, BN folding, grids, first network pass) "
          f"{100 * other / total:.0f}%; matmul peak {peak:.0f} GFLOP/s at {args.threads} "
          f"thread(s); {args.num_calib} images, {args.iters} iterations, loss {cfg.loss}")
    if args.json:
        with args.json.open("a") as fh:
            fh.write(json.dumps({"model": args.model, "src": str(args.src or "HEAD"),
                                 "loss": cfg.loss, "wall": total, "peak_gflops": peak,
                                 "threads": args.threads, "num_calib": args.num_calib,
                                 "iters": args.iters, "sums": sums, "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
