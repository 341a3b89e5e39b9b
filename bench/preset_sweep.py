"""Accuracy of short schedules and subsampled moments: one network, several configs, one process.

    python bench/preset_sweep.py --model resnet20 '{"iters": 100, "lr": 0.03}' \
        '{"fast": true}' '{"fast": true, "moment_positions": 16384}' --threads 1

Each argument is a JSON object of QuantConfig options (W4, seed 0 unless given); `"fast":
true` starts from QuantConfig.fast() instead of the defaults. Prints top-1 and the time of each
`quantize` (data + moments, steps); the times are only comparable within one quiet run, the
accuracies are what this script is for (BENCHMARKS.md, "Time to accuracy"). EfficientNet-Lite0
runs per channel on the 200/800 split of the ImageNet sample, the CIFAR ResNets per tensor on
1024 images of the pool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["resnet20", "resnet56", "efficientnet_lite0"],
                   default="resnet20")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="append one JSON line per config here")
    p.add_argument("configs", nargs="+", help="QuantConfig options as JSON objects")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from bench_weights import load_cifar, load_effnet

    import adaround
    from adaround.evaluate import accuracy

    if args.model == "efficientnet_lite0":
        model, calib, x_eval, y_eval = load_effnet(200, 0)
        base = {"weight_bits": 4, "per_channel": True, "seed": 0}
    else:
        model, calib, x_eval, y_eval = load_cifar(args.model, 1024, 0)
        base = {"weight_bits": 4, "seed": 0}
    for spec in args.configs:
        options = json.loads(spec)
        fast = options.pop("fast", False)
        make = adaround.QuantConfig.fast if fast else adaround.QuantConfig
        cfg = make(**{**base, **options})
        load = os.getloadavg()[0]
        start = time.perf_counter()
        qmodel = adaround.quantize(model, calib, cfg)
        seconds = time.perf_counter() - start
        report = qmodel.adaround_report
        row = {"model": args.model, "config": spec, "iters": cfg.iters, "lr": cfg.lr,
               "loss": cfg.loss, "moment_positions": cfg.moment_positions,
               "top1": accuracy(qmodel, x_eval, y_eval)[1], "seconds": round(seconds, 1),
               "data_seconds": round(sum(r.data_seconds for r in report), 1),
               "step_seconds": round(sum(r.step_seconds for r in report), 1),
               "threads": args.threads, "load": load}
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
