"""Activation quantization benchmark: nearest / layer-wise AdaRound / BRECQ / QDrop at W4A8,
W4A4 and W2A4 (and the W4A32 reference), accuracy and wall time.

Settings (the literature's conventions, printed with every row):

* W4A8 and W4A32: the paper's: every layer W4, every layer input A8 (model input included).
* W4A4, W2A4: first and last layer weights 8-bit, model input and last layer input A8
  (BRECQ/QDrop).
* nearest: rounding to nearest on the same grids (the floor); activation ranges as AdaRound's.
* adaround: layer-wise, fixed activation ranges: min-max at A8 (the paper's), MSE at A4 (fairer
  than min-max at 4 bits; `--adaround-range` changes it).
* brecq: block reconstruction, MSE-initialised activation steps learned jointly (LSQ),
  `--fisher` adds the Fisher weighting. qdrop: the same with QDrop p = 0.5.

Reads the shared data like bench_weights.py, prints a markdown table and appends one JSON line
per run to --json.

    python bench/bench_act.py --model resnet20 --setting W4A8 W4A4 W2A4 --grid channel \
        --num-calib 1024 --iters 2000 --threads 1 --json bench/results/act.jsonl
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
from typing import Any

import torch
from bench_weights import load_cifar, load_effnet

import adaround
from adaround.allocator import keep_freed_memory
from adaround.evaluate import accuracy

SETTINGS = {  # weight bits, act bits, literature's first/last 8-bit convention
    "W4A32": (4, None, False),
    "W4A8": (4, 8, False),
    "W4A4": (4, 4, True),
    "W2A4": (2, 4, True),
}
METHODS = ("nearest", "adaround", "brecq", "qdrop")


def make_config(setting: str, method: str, args: argparse.Namespace) -> adaround.QuantConfig:
    wbits, abits, eight = SETTINGS[setting]
    common: dict[str, Any] = dict(weight_bits=wbits, per_channel=args.grid == "channel",
                                  iters=args.iters, seed=args.seed, act_bits=abits,
                                  batch_size=args.batch_size, lr=args.lr,
                                  symmetric=not args.asymmetric)
    if eight:
        common.update(first_last_bits=8, input_act_bits=8, last_act_bits=8)
    layer_range = None
    if abits is not None:
        layer_range = args.adaround_range or ("minmax" if abits >= 8 else "mse")
    if method == "nearest":
        return adaround.QuantConfig(rounding="nearest", act_range=layer_range, **common)
    if method == "adaround":
        return adaround.QuantConfig(method="adaround", act_range=layer_range, loss=args.loss,
                                    **common)
    return adaround.QuantConfig(method=method, fisher=args.fisher and method == "brecq",
                                **common)


def table(paths: list[Path]) -> str:
    """One markdown table of every run in the JSON-lines files (the last run of a cell wins):
    a row per model, W/A setting and seed (which also picks the calibration/evaluation split),
    a column per method, top-1 % (delta to FP)."""
    cells: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                run = json.loads(line)
                key = (run["model"], run["setting"], run.get("seed", 0))
                cells.setdefault(key, {})[run["method"]] = run
    head = ("| model | W/A | FP | nearest | AdaRound (layer) | BRECQ | QDrop | calib | iters |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    order = {m: i for i, m in enumerate(["resnet20", "resnet56", "efficientnet_lite0"])}
    for (model, setting, seed), runs in sorted(cells.items(), key=lambda kv: (
            order.get(kv[0][0], 9), list(SETTINGS).index(kv[0][1]), kv[0][2])):
        any_run = next(iter(runs.values()))
        fp = any_run["fp_top1"]

        def cell(method: str, runs: dict[str, dict[str, Any]] = runs, fp: float = fp) -> str:
            run = runs.get(method)
            if run is None:
                return "-"
            fisher = " (Fisher)" if run.get("fisher") else ""
            return f"{run['top1']:.2f} ({run['top1'] - fp:+.2f}){fisher}"

        iters = sorted({str(r["iters"]) + (f" (batch {r['batch_size']})"
                                           if r.get("batch_size", 32) != 32 else "")
                        + (f" lr {r['lr']:g}" if r.get("lr", 1e-3) != 1e-3 else "")
                        for m, r in runs.items() if m != "nearest"})
        name = f"{model} (seed {seed})" if seed else model
        rows.append(f"| {name} | {setting[1:].replace('A', '/')} | {fp:.2f} | "
                    + " | ".join(cell(m) for m in METHODS)
                    + f" | {any_run['num_calib']} | {'/'.join(iters) or '-'} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", type=Path, nargs="+",
                   help="only print the table of these JSON-lines files, run nothing")
    p.add_argument("--model", choices=["resnet20", "resnet56", "efficientnet_lite0"])
    p.add_argument("--setting", nargs="+", choices=list(SETTINGS),
                   default=["W4A8", "W4A4", "W2A4"])
    p.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--grid", choices=["tensor", "channel"], default="channel")
    p.add_argument("--num-calib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=2000, help="iterations per unit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="samples per step (32)")
    p.add_argument("--asymmetric", action="store_true",
                   help="weight grids with a zero point (BRECQ/QDrop's; default symmetric)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam's learning rate for V (1e-3: the paper's, for 10k-20k iterations; "
                   "a step moves V by about lr, so short runs flip few weights)")
    p.add_argument("--loss", choices=["auto", "sampled"], default="sampled",
                   help="layer-wise AdaRound's loss (sampled: the paper's)")
    p.add_argument("--adaround-range", choices=["minmax", "mse", "percentile"],
                   help="activation ranges of nearest/adaround (default: minmax at A8, mse "
                   "below)")
    p.add_argument("--fisher", action="store_true", help="Fisher-weighted BRECQ")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, help="append one JSON line per run here")
    args = p.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    if args.model is None:
        p.error("--model is required (or --table to print results)")
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
    print(f"| model | W/A | method | grid | act ranges | top-1 % | FP % | delta | time s |\n"
          f"|---|---|---|---|---|---|---|---|---|\n"
          f"| {args.model} | 32/32 | FP | - | - | {fp:.2f} | {fp:.2f} | - | - |", flush=True)
    for setting in args.setting:
        for method in args.method:
            cfg = make_config(setting, method, args)
            start = time.perf_counter()
            qmodel = adaround.quantize(model, calib, cfg)
            seconds = time.perf_counter() - start
            top1 = accuracy(qmodel, x_eval, y_eval)[1]
            ranges = "-" if cfg.act_bits is None else (
                f"{cfg.act_range}{' learned' if cfg.learn_act_scale else ''}")
            units = sum(1 for r in qmodel.adaround_report if getattr(r, "kind", "") == "block")
            print(f"| {args.model} | {setting[1:].replace('A', '/')} | {method}"
                  f"{' +fisher' if cfg.fisher else ''} | per-{args.grid} | {ranges} | "
                  f"{top1:.2f} | {fp:.2f} | {top1 - fp:+.2f} | {seconds:.0f} |", flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                with args.json.open("a") as fh:
                    fh.write(json.dumps({
                        "model": args.model, "setting": setting, "method": method,
                        "weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits,
                        "first_last_8bit": SETTINGS[setting][2], "grid": args.grid,
                        "act_range": cfg.act_range, "learn_act_scale": cfg.learn_act_scale,
                        "unit": cfg.unit, "qdrop": cfg.qdrop, "fisher": cfg.fisher,
                        "blocks": units, "top1": top1, "fp_top1": fp, "seconds": seconds,
                        "num_calib": len(calib), "iters": args.iters,
                        "batch_size": args.batch_size, "lr": args.lr,
                        "symmetric": cfg.symmetric,
                        "loss": cfg.loss if method == "adaround" else "sampled",
                        "eval_samples": len(x_eval), "seed": args.seed, "machine": machine,
                        "commit": commit,
                    }) + "\n")
    print(f"\n{len(calib)} calibration samples, {args.iters} iterations per unit, batch "
          f"{args.batch_size}, lr {args.lr:g}, "
          f"{len(x_eval)} evaluation samples; {machine}; commit {commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
