"""Where the time of a quantization goes on 1 process and on each of N (torchrun): data and
moments, steps, per-layer results, the rest, from `adaround_report`.

    OMP_NUM_THREADS=1 python bench/distributed_phases.py
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/distributed_phases.py

ResNet-56 W4, 1024 images, 500 iterations at lr 0.006, one thread per process (the settings of
BENCHMARKS.md's 1-vs-2-process rows).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    from bench_weights import load_cifar

    import adaround
    from adaround.allocator import keep_freed_memory

    keep_freed_memory()  # as the command line does

    model, calib, _, _ = load_cifar("resnet56", 1024, 0)
    cfg = adaround.QuantConfig(weight_bits=4, iters=500, lr=0.006)
    start = time.perf_counter()
    qmodel = adaround.quantize(model, calib, cfg)
    report = qmodel.adaround_report
    total = time.perf_counter() - start
    data = sum(r.data_seconds for r in report)
    steps = sum(r.step_seconds for r in report)
    layers = sum(r.seconds for r in report)
    print(f"process {os.environ.get('RANK', '-')} of {os.environ.get('WORLD_SIZE', 1)}: "
          f"total {total:.1f} s, data and moments {data:.1f} s, steps {steps:.1f} s, per-layer "
          f"results {layers - data - steps:.1f} s, rest {total - layers:.1f} s "
          f"(load {os.getloadavg()[0]:.2f})", flush=True)
    step: dict[tuple, list[float]] = {}
    phases: dict[tuple, list[tuple[float, float, float]]] = {}
    for r in report:
        shape = tuple(qmodel.get_submodule(r.name).layer.weight.shape[:2])
        step.setdefault(shape, []).append(1e3 * r.step_seconds / max(r.iters, 1))
        phases.setdefault(shape, []).append(
            (r.data_seconds, r.step_seconds, r.seconds - r.data_seconds - r.step_seconds))
    who = f"process {os.environ.get('RANK', '-')}"
    print(f"{who}: ms a step by layer (C_out, C_in): " + ", ".join(
        f"{k}: {sum(v) / len(v):.3f} (x{len(v)})" for k, v in sorted(step.items())), flush=True)
    print(f"{who}: s of data / steps / results by layer (C_out, C_in), summed: " + ", ".join(
        f"{k}: " + " / ".join(f"{sum(p[i] for p in v):.2f}" for i in range(3))
        for k, v in sorted(phases.items())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
