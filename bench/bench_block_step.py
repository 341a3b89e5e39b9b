"""Cost of one BRECQ/QDrop block step: the activation quantizers' element-wise passes before
and after the QDrop-mask change, and eager against torch.compile (`compile=True`).

    python bench/bench_block_step.py --threads 1

Units: EfficientNet-Lite0's `_blocks.1` (16 -> 96 channels at 112x112, depthwise 3x3 stride
2, 96 -> 24: the costliest block of the network) and ResNet-20's `layer1.0` (16 channels at
32x32), each quantized alone (`include`) at W4A4 with QDrop p = 0.5 and learned steps, on
random inputs (the cost of a step does not depend on the values). Variants alternate, twice,
in one process, so machine load hits all alike; the table gives seconds per step (the
`step_seconds` of the unit's report, excluding data capture) and the ratio to `before`:

* before: the QDrop mask of the first version (torch.rand per element, in NCHW whatever the
  activation's layout), reproduced here;
* eager: the library's mask (one random byte per element, drawn 8 at a time, in the
  activation's layout);
* compiled: eager + compile=True (the quantizers' passes fused by torch.compile; its one-off
  compilation is paid in a warm-up run, not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import adaround
import adaround.nn.act_quant as act_quant
from adaround.models.cifar_resnet import resnet20


def _mask_before(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
    return u < p


UNITS: dict[str, tuple[Callable[[], nn.Module], str, tuple[int, ...]]] = {
    # name: (model factory, unit, input shape of one sample)
    "efficientnet_lite0 _blocks.1": (lambda: _effnet(), "_blocks.1", (3, 224, 224)),
    "resnet20 layer1.0": (lambda: resnet20(), "layer1.0", (3, 32, 32)),
}


def _effnet() -> nn.Module:
    from adaround.models.efficientnet import efficientnet_lite0

    return efficientnet_lite0(pretrained=False)


def step_seconds(model: nn.Module, unit: str, x: Tensor, iters: int, batch: int,
                 compiled: bool) -> float:
    cfg = adaround.QuantConfig(method="qdrop", weight_bits=4, per_channel=True, act_bits=4,
                               iters=iters, batch_size=batch, include=(f"{unit}.*",),
                               compile=compiled)
    qmodel = adaround.quantize(model, x, cfg)
    (result,) = [r for r in qmodel.adaround_report if r.name == unit]
    return result.step_seconds / result.iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", nargs="+", choices=list(UNITS), default=list(UNITS))
    p.add_argument("--iters", type=int, default=20, help="steps per timed run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="append one JSON line per unit here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    library_mask = act_quant.qdrop_mask
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    print("| unit | batch | before s/step | eager s/step | compiled s/step | "
          "eager vs before | compiled vs before |\n|---|---|---|---|---|---|---|")
    for name in args.units:
        factory, unit, shape = UNITS[name]
        model = factory().eval()
        x = torch.randn(2 * args.batch_size, *shape, generator=torch.Generator().manual_seed(0))
        step_seconds(model, unit, x, 2, args.batch_size, compiled=True)  # compile once
        times: dict[str, list[float]] = {"before": [], "eager": [], "compiled": []}
        for _ in range(args.repeats):
            for variant in times:
                act_quant.qdrop_mask = _mask_before if variant == "before" else library_mask
                try:
                    times[variant].append(step_seconds(model, unit, x, args.iters,
                                                       args.batch_size, variant == "compiled"))
                finally:
                    act_quant.qdrop_mask = library_mask
        best = {k: min(v) for k, v in times.items()}
        print(f"| {name} | {args.batch_size} | {best['before']:.3f} | {best['eager']:.3f} | "
              f"{best['compiled']:.3f} | {best['before'] / best['eager']:.2f}x | "
              f"{best['before'] / best['compiled']:.2f}x |", flush=True)
        if args.json:
            row: dict[str, Any] = {"unit": name, "batch_size": args.batch_size,
                                   "iters": args.iters, "seconds_per_step": best,
                                   "all": times, "machine": machine,
                                   "load": round(os.getloadavg()[0], 2),
                                   "time": time.strftime("%Y-%m-%d %H:%M")}
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\nW4A4 QDrop p=0.5, learned steps; best of {args.repeats} runs of {args.iters} "
          f"steps; {machine}", file=sys.stderr)


if __name__ == "__main__":
    main()
