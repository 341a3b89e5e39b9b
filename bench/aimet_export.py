"""AIMET hand-over, adaround side: quantize ResNet-20, write `export_aimet`'s files and the
simulated model's logits on the CIFAR-10 test set, one folder per setting.

    python bench/aimet_export.py --out /tmp/aimet_handover --iters 300 --threads 1
    /work/aimet-venv/bin/python bench/aimet_consume.py --dir /tmp/aimet_handover

Settings: w4_tensor (W4 symmetric per tensor), w4_channel (per channel), w4_asym (asymmetric
per tensor), w4a8 (W4 per tensor, 8-bit layer inputs). AdaRound with `--iters` per layer at
lr 3/iters on `--num-calib` images (the export is what is checked, not the accuracy).
Each folder gets the five AIMET files (prefix "model"), `logits.npy` (the simulated model's
logits, float32, 10000 x 10) and `setting.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

import adaround
from adaround.export.aimet import export_aimet

sys.path.insert(0, str(Path(__file__).parent))
from bench_weights import load_cifar  # noqa: E402

SETTINGS = {
    "w4_tensor": {"weight_bits": 4},
    "w4_channel": {"weight_bits": 4, "per_channel": True},
    "w4_asym": {"weight_bits": 4, "symmetric": False},
    "w4a8": {"weight_bits": 4, "act_bits": 8},
}


def logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    model, calib, x_test, y_test = load_cifar("resnet20", args.num_calib, args.seed)
    for name in args.settings:
        start = time.perf_counter()
        cfg = adaround.QuantConfig(iters=args.iters, lr=3.0 / args.iters, seed=args.seed,
                                   **SETTINGS[name])
        qmodel = adaround.quantize(model, calib, cfg)
        folder = Path(args.out) / name
        export_aimet(qmodel, x_test[:1], folder)
        out = logits(qmodel, x_test)
        np.save(folder / "logits.npy", out)
        top1 = float((out.argmax(1) == y_test.numpy()).mean() * 100)
        (folder / "setting.json").write_text(json.dumps(
            {"setting": name, "config": SETTINGS[name], "iters": args.iters, "top1": top1}))
        print(json.dumps({"setting": name, "top1": round(top1, 2),
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
