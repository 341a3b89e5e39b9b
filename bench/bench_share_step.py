"""A layer's rounding step whole against one process's half of its rows, with 2 processes
stepping at the same time (as inside a 2-process quantization): what ROW_SPLIT_MIN in
adaround.distributed is set from.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/bench_share_step.py

3 x 3 convolutions of ResNet-56's three widths (16 x 144, 32 x 288 and 64 x 576 weights), W4,
500 steps without early stop, moments from 64 random inputs; median of 5 alternations.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import adaround
from adaround import distributed
from adaround.nn.quant_layer import QuantLayer
from adaround.reconstruct import loop
from adaround.reconstruct.quadratic import accumulate_moments

STEPS = 500


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = adaround.QuantConfig(weight_bits=4, iters=STEPS, lr=0.006, early_stop=False)
    for channels, size in ((16, 32), (32, 16), (64, 8)):
        torch.manual_seed(0)
        layer = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        qlayer = QuantLayer(layer, 4, False, True)
        qlayer.fit_grid("mse")
        x = torch.randn(64, channels, size, size)
        moments = accumulate_moments(layer, [(x + 0.1 * torch.randn_like(x), x)])
        whole: list[float] = []
        share: list[float] = []
        for _ in range(5):
            dist.barrier()
            start = time.perf_counter()
            loop.run_rounding(qlayer, loop.Objective(loop.QuadraticLoss(qlayer, moments)), cfg)
            whole.append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            distributed.round_share(qlayer, moments, cfg, rank, world)
            share.append(time.perf_counter() - start)
        print(f"process {rank} of {world}: {channels} x {9 * channels} weights, ms a step: "
              f"whole {1e3 * statistics.median(whole) / STEPS:.3f}, its share "
              f"{1e3 * statistics.median(share) / STEPS:.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
