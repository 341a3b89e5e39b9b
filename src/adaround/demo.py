"""The built-in demo: a small pretrained CNN on Fashion-MNIST, FP vs nearest vs AdaRound.

Everything it needs installs offline: the network's weights ship with the package, the data
comes from Debian's `dataset-fashion-mnist`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from adaround.api import quantize
from adaround.config import QuantConfig
from adaround.errors import ConfigError
from adaround.evaluate import accuracy

log = logging.getLogger(__name__)

DEMO_ITERS = 500
DEMO_CALIB = 256


@dataclass(frozen=True)
class DemoRow:
    setting: str
    rounding: str
    top1: float
    seconds: float


def run_demo(
    bits: tuple[int, ...] = (4, 3),
    iters: int | None = None,
    n_calib: int | None = None,
    progress: bool = False,
    lr: float | None = None,
) -> list[DemoRow]:
    """Quantize the demo network at each bit width with nearest and AdaRound rounding, at lr
    3 / iters unless given (the paper's 1e-3 is for 10k iterations: config.short_run_note)."""
    from adaround.data.fashion_mnist import load_fashion_mnist
    from adaround.models.fashion_net import fashion_net

    for name, value in (("iters", iters), ("n_calib", n_calib)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name}={value!r} must be a positive integer: pass 1 or more, "
                              "or None for the default")
    iters = iters or DEMO_ITERS
    lr = lr or 3 / iters
    n_calib = n_calib or DEMO_CALIB
    model = fashion_net()
    x_train, _ = load_fashion_mnist("train")
    calib = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
                    [:n_calib]]
    x_test, y_test = load_fashion_mnist("test")
    log.info("Fashion-MNIST: %d calibration images (train split), %d test images; "
             "%d iterations per layer at lr %g", len(calib), len(x_test), iters, lr)
    rows = [DemoRow("FP32", "-", accuracy(model, x_test, y_test)[1], 0.0)]
    for b in bits:
        for rounding in ("nearest", "adaround"):
            cfg = QuantConfig(weight_bits=b, rounding=rounding, iters=iters, lr=lr)
            start = time.perf_counter()
            qmodel = quantize(model, calib, cfg, progress=progress)
            seconds = time.perf_counter() - start
            rows.append(DemoRow(f"W{b}A32 per-tensor", rounding,
                                accuracy(qmodel, x_test, y_test)[1], seconds))
            log.info("W%d %s: %.2f%% (%.1fs)", b, rounding, rows[-1].top1, seconds)
    return rows


def format_table(rows: list[DemoRow]) -> str:
    lines = [f"{'weights':<18} {'rounding':<9} {'top-1 %':>8} {'time s':>7}"]
    lines += [f"{r.setting:<18} {r.rounding:<9} {r.top1:>8.2f} {r.seconds:>7.1f}" for r in rows]
    return "\n".join(lines)
