"""What the always-on equivalence checks cost, and wrapper against parametrization.

1. The checks: `quantize` runs the prepared float network, its unfolded copy and the network
   with quantized twins swapped in on CHECK_SAMPLES calibration samples (three forwards). This
   times those forwards against a whole `quantize` call (nearest rounding, the cheapest, and
   AdaRound at --iters) on ResNet-20 and EfficientNet-Lite0, in one process.
2. Where the quantizer lives: the QuantLayer wrapper (today) against
   torch.nn.utils.parametrize on the weight (the user's module and class kept), forward time
   of the quantized network, alternating, best of --repeats.

    python bench/bench_prepare.py --threads 1 --json bench/results/prepare.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).parent))
from bench_weights import load_cifar, load_effnet  # noqa: E402

import adaround  # noqa: E402
from adaround.api import check_wrapped, float_copy, prepare_float  # noqa: E402
from adaround.config import QuantConfig  # noqa: E402
from adaround.equivalence import CHECK_SAMPLES, run_outputs  # noqa: E402
from adaround.nn.quant_layer import QuantLayer  # noqa: E402
from adaround.prepare import plan_layers, swap_in_quant_layers  # noqa: E402

log = logging.getLogger("bench")


def _best(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def check_cost(model: nn.Module, x: torch.Tensor, iters: int, repeats: int) -> dict:
    cfg = QuantConfig(weight_bits=4, per_channel=True, rounding="nearest")
    fp, trace, _ = prepare_float(model, x, cfg)
    qmodel = swap_in_quant_layers(float_copy(fp), plan_layers(fp, trace, cfg), cfg)
    xb = x[:CHECK_SAMPLES]

    def checks() -> None:  # the reference, the folded copy, the wrapped copy
        run_outputs(float_copy(model), xb)
        run_outputs(fp, xb)
        check_wrapped(fp, qmodel, x)

    out = {"check_s": _best(checks, repeats),
           "nearest_s": _best(lambda: adaround.quantize(model, x, cfg), repeats)}
    if iters:
        ada = QuantConfig(weight_bits=4, per_channel=True, iters=iters, lr=3 / iters)
        start = time.perf_counter()
        adaround.quantize(model, x, ada)
        out["adaround_s"] = time.perf_counter() - start
    return out


class _Dequantize(nn.Module):
    """A parametrization: the weight is codes x scale (what QuantLayer computes)."""

    def __init__(self, qlayer: QuantLayer) -> None:
        super().__init__()
        self.register_buffer("codes", qlayer.codes.clone())
        self.register_buffer("scale", qlayer.weight_scale().clone())

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        return self.codes.to(self.scale.dtype) * self.scale


def wrapper_vs_parametrize(model: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    cfg = QuantConfig(weight_bits=4, per_channel=True, rounding="nearest")
    wrapped = adaround.quantize(model, x, cfg)
    param, _, _ = prepare_float(model, x, cfg)  # the folded float network, modules kept
    for name, module in list(wrapped.named_modules()):
        if isinstance(module, QuantLayer):
            parametrize.register_parametrization(param.get_submodule(name), "weight",
                                                 _Dequantize(module), unsafe=True)
    batch = x[:64]
    with torch.no_grad():
        assert torch.allclose(wrapped(batch), param(batch), rtol=1e-4, atol=1e-5)
        timings: dict[str, list[float]] = {"wrapper_s": [], "parametrize_s": []}
        for _ in range(repeats):  # alternating, so both see the same machine load
            timings["wrapper_s"].append(_best(lambda: wrapped(batch), 1))
            timings["parametrize_s"].append(_best(lambda: param(batch), 1))
    return {k: min(v) for k, v in timings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "efficientnet_lite0"])
    ap.add_argument("--num-calib", type=int, default=256)
    ap.add_argument("--iters", type=int, default=100, help="AdaRound run for scale (0: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="append one JSON line per model")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    for name in args.models:
        try:
            if name == "efficientnet_lite0":
                model, x, _, _ = load_effnet(min(args.num_calib, 200), 0)
            else:
                model, x, _, _ = load_cifar(name, args.num_calib, 0)
        except FileNotFoundError as exc:
            print(f"skip {name}: {exc}")
            continue
        row = {"model": name, "num_calib": len(x), "threads": args.threads,
               "machine": platform.processor() or platform.machine(),
               "load": os.getloadavg()[0]}
        row.update(check_cost(model.eval(), x, args.iters, args.repeats))
        row.update(wrapper_vs_parametrize(model.eval(), x, args.repeats))
        row["check_share_of_nearest"] = row["check_s"] / row["nearest_s"]
        print(json.dumps(row))
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
