"""Cost of the unit loop's data capture (BRECQ/QDrop): the one-pass graph engine against
re-running the network from its input for every unit.

    python bench/bench_unit_data.py --threads 1

Each model is quantized at W4A4 with QDrop (blocks found automatically) for 2 iterations per
unit, so the time left over is the data capture: for every unit, its inputs in the quantized
network and its FP output. The inputs are random (the cost does not depend on the values).
The two variants alternate in one process (`--repeats` times each, best kept), so machine load
hits both alike; the table gives the units' seconds outside their optimisation steps (the sum
of `seconds - step_seconds` over the report) and whether both gave the same rounding.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import adaround
import adaround.reconstruct.units as units
from adaround.models.cifar_resnet import resnet20, resnet56
from adaround.reconstruct.stream import RerunEngine


def _effnet() -> nn.Module:
    from adaround.models.efficientnet import efficientnet_lite0

    return efficientnet_lite0(pretrained=False)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (factory, input shape of one sample, default number of calibration samples)
    "resnet20": (resnet20, (3, 32, 32), 1024),
    "resnet56": (resnet56, (3, 32, 32), 1024),
    "efficientnet_lite0": (_effnet, (3, 224, 224), 200),
}


def _rerun_engine(fp: nn.Module, qmodel: nn.Module, chunks: list[Tensor], *_: Any,
                  **__: Any) -> RerunEngine:
    return RerunEngine(fp, qmodel, chunks)


def capture_seconds(model: nn.Module, x: Tensor,
                    rerun: bool) -> tuple[float, int, list[Tensor]]:
    """Seconds of the unit loop outside the optimisation steps, the number of units, and the
    resulting codes."""
    cfg = adaround.QuantConfig(method="qdrop", weight_bits=4, per_channel=True, act_bits=4,
                               iters=2, batch_size=16)
    library_engine = units.make_engine
    units.make_engine = _rerun_engine if rerun else library_engine  # type: ignore[assignment]
    try:
        qmodel = adaround.quantize(model, x, cfg)
    finally:
        units.make_engine = library_engine
    seconds = sum(r.seconds - r.step_seconds for r in qmodel.adaround_report)
    codes = [m.codes.clone() for m in qmodel.modules() if isinstance(m, adaround.QuantLayer)]
    return seconds, len(qmodel.adaround_report), codes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--num-calib", type=int, help="calibration samples (default per model)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="append one JSON line per model here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("adaround").setLevel(logging.ERROR)  # 2 iterations warn of a short run
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    print("| model | samples | units | re-run s | one pass s | speed-up | same rounding |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for name in args.models:
        factory, shape, default_n = MODELS[name]
        n = args.num_calib or default_n
        model = factory().eval()
        x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {"rerun": [], "one_pass": []}
        codes: dict[str, list[Tensor]] = {}
        for _ in range(args.repeats):
            for variant in times:
                seconds, count, codes[variant] = capture_seconds(model, x, variant == "rerun")
                times[variant].append(seconds)
        best = {k: min(v) for k, v in times.items()}
        same = all(torch.equal(a, b) for a, b in zip(codes["rerun"], codes["one_pass"]))
        print(f"| {name} | {n} | {count} | {best['rerun']:.1f} | {best['one_pass']:.1f} | "
              f"{best['rerun'] / best['one_pass']:.1f}x | {'yes' if same else 'NO'} |", flush=True)
        if args.json:
            row = {"model": name, "samples": n, "units": count, "seconds": best, "all": times,
                   "same_rounding": same, "machine": machine}
            with args.json.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
