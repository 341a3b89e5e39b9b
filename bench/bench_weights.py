"""Weight-only quantization benchmark: FP / nearest / AdaRound, accuracy and wall time.

Reads the shared data (ResNet-20/56 on CIFAR-10, EfficientNet-Lite0 on the ImageNet sample)
from $ADAROUND_DATA or ../shared/data and skips, with a message, what is absent. Prints a
markdown table and appends one JSON line per run to --json.

    python bench/bench_weights.py --model resnet20 --bits 4 3 --grid tensor channel \
        --num-calib 1024 --iters 2000 --json bench/results/weights.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import adaround
from adaround.allocator import keep_freed_memory
from adaround.config import LOSSES, QuantConfig
from adaround.data.files import data_root, imagenet_sample_split, load_array_file
from adaround.evaluate import accuracy

log = logging.getLogger("bench")


def load_cifar(name: str, n_calib: int, seed: int):  # type: ignore[no-untyped-def]
    from adaround.models.cifar_resnet import CIFAR_MEAN, CIFAR_STD, resnet20, resnet56

    root = data_root() / "cifar10"
    weights = root / f"{name}.th"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is absent: set ADAROUND_DATA to the shared data")
    model = {"resnet20": resnet20, "resnet56": resnet56}[name](weights)
    pool, _ = load_array_file(root / "cifar10_train5k.npz", mean=CIFAR_MEAN, std=CIFAR_STD)
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n_calib]
    x_test, y_test = load_array_file(root / "cifar10_test.npz", mean=CIFAR_MEAN, std=CIFAR_STD)
    return model, pool[pick], x_test, y_test


def load_effnet(n_calib: int, seed: int):  # type: ignore[no-untyped-def]
    from adaround.models.efficientnet import (
        EFFICIENTNET_LITE_MEAN,
        EFFICIENTNET_LITE_STD,
        efficientnet_lite0,
    )

    model = efficientnet_lite0()
    x_calib, x_eval, y_eval = imagenet_sample_split(
        data_root() / "imagenet-sample", n_calib=n_calib, seed=seed,
        mean=EFFICIENTNET_LITE_MEAN, std=EFFICIENTNET_LITE_STD)
    return model, x_calib, x_eval, y_eval


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["resnet20", "resnet56", "efficientnet_lite0"],
                   required=True)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--grid", nargs="+", choices=["tensor", "channel"],
                   default=["tensor", "channel"])
    p.add_argument("--rounding", nargs="+", default=["nearest", "adaround"])
    p.add_argument("--num-calib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=list(LOSSES), default=QuantConfig.loss,
                   help="reconstruction loss (sampled: the paper's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, help="append one JSON line per run here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.model == "efficientnet_lite0":
            model, calib, x_eval, y_eval = load_effnet(args.num_calib, args.seed)
        else:
            model, calib, x_eval, y_eval = load_cifar(args.model, args.num_calib, args.seed)
    except (FileNotFoundError, ImportError) as exc:
        print(f"skipped {args.model}: {exc}")
        return 0
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    fp = accuracy(model, x_eval, y_eval)[1]
    rows = [(args.model, "FP32", "-", fp, 0.0)]
    print(f"| model | weights | rounding | top-1 % | time s |\n|---|---|---|---|---|\n"
          f"| {args.model} | FP32 | - | {fp:.2f} | - |", flush=True)
    for bits in args.bits:
        for grid in args.grid:
            for rounding in args.rounding:
                cfg = adaround.QuantConfig(weight_bits=bits, per_channel=grid == "channel",
                                           rounding=rounding, iters=args.iters, seed=args.seed,
                                           loss=args.loss)
                start = time.perf_counter()
                qmodel = adaround.quantize(model, calib, cfg)
                seconds = time.perf_counter() - start
                top1 = accuracy(qmodel, x_eval, y_eval)[1]
                setting = f"W{bits} per-{grid}"
                rows.append((args.model, setting, rounding, top1, seconds))
                print(f"| {args.model} | {setting} | {rounding} | {top1:.2f} | {seconds:.0f} |",
                      flush=True)
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    with args.json.open("a") as fh:
                        fh.write(json.dumps({
                            "model": args.model, "bits": bits, "grid": grid,
                            "rounding": rounding, "top1": top1, "fp_top1": fp,
                            "seconds": seconds, "num_calib": len(calib), "iters": args.iters,
                            "eval_samples": len(x_eval), "seed": args.seed, "machine": machine,
                            "commit": commit, "loss": args.loss,
                        }) + "\n")
    print(f"\n{len(calib)} calibration samples, {args.iters} iterations per layer, batch 32, "
          f"{len(x_eval)} evaluation samples; {machine}; commit {commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
