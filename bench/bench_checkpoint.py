"""Checkpoint overhead and byte-identical resume on real networks.

For each setting: one run without a checkpoint, one with `checkpoint_dir` (the time spent
writing checkpoints is summed separately: the overhead without run-to-run noise), and one
stopped after `--stop-after` units and resumed; the three saved files are compared byte for
byte. Prints a markdown table; one JSON line per setting to --json.

    OMP_NUM_THREADS=1 python bench/bench_checkpoint.py --setting resnet20-w4 resnet20-w4a4-qdrop \
        --num-calib 256 --iters 500 --threads 1
    OMP_NUM_THREADS=1 python bench/bench_checkpoint.py --setting effnet-w4a4-qdrop \
        --num-calib 64 --iters 20 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_weights import load_cifar, load_effnet

import adaround
import adaround.checkpoint as ck

SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet20-w4": ("resnet20", {"weight_bits": 4}),
    "resnet20-w4a4-qdrop": ("resnet20", {"weight_bits": 4, "act_bits": 4, "method": "qdrop",
                                         "first_last_bits": 8, "input_act_bits": 8,
                                         "last_act_bits": 8}),
    "effnet-w4a4-qdrop": ("efficientnet_lite0", {"weight_bits": 4, "act_bits": 4,
                                                 "method": "qdrop", "first_last_bits": 8,
                                                 "input_act_bits": 8, "last_act_bits": 8,
                                                 "per_channel": True}),
}


class _Stop(Exception):
    pass


def _sha(qmodel: torch.nn.Module, folder: Path, name: str) -> str:
    path = folder / name
    adaround.save(qmodel, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    model_name, options = SETTINGS[setting]
    model, calib = (load_effnet(args.num_calib, 0)[:2] if model_name == "efficientnet_lite0"
                    else load_cifar(model_name, args.num_calib, 0)[:2])
    cfg = adaround.QuantConfig(iters=args.iters, lr=3 / args.iters, seed=0, **options)
    work = Path(tempfile.mkdtemp(prefix="bench-ck-"))
    start = time.perf_counter()
    plain = _sha(adaround.quantize(model, calib, cfg), work, "plain.pt")
    plain_s = time.perf_counter() - start

    record, spent, units = ck.Checkpoint.record, [0.0], [0]

    def timed(self, *a, **k):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        record(self, *a, **k)
        spent[0] += time.perf_counter() - t
        units[0] += 1

    ck.Checkpoint.record = timed  # type: ignore[method-assign]
    start = time.perf_counter()
    checked = _sha(adaround.quantize(model, calib, cfg, checkpoint_dir=work / "ck"), work,
                   "checkpointed.pt")
    checked_s = time.perf_counter() - start
    size_mb = (work / "ck" / ck.FILE).stat().st_size / 2**20

    def stopping(self, *a, **k):  # type: ignore[no-untyped-def]
        record(self, *a, **k)
        if len(self.done) >= args.stop_after:
            raise _Stop

    ck.Checkpoint.record = stopping  # type: ignore[method-assign]
    try:
        adaround.quantize(model, calib, cfg, checkpoint_dir=work / "resume")
    except _Stop:
        pass
    ck.Checkpoint.record = record  # type: ignore[method-assign]
    start = time.perf_counter()
    resumed = _sha(adaround.quantize(model, calib, cfg, checkpoint_dir=work / "resume"), work,
                   "resumed.pt")
    resumed_s = time.perf_counter() - start
    return {"setting": setting, "num_calib": args.num_calib, "iters": args.iters,
            "units": units[0], "plain_s": round(plain_s, 2), "checkpoint_s": round(checked_s, 2),
            "writes_s": round(spent[0], 3),
            "write_ms_per_unit": round(1000 * spent[0] / units[0], 1),
            "file_mb": round(size_mb, 2), "stopped_after": args.stop_after,
            "resumed_s": round(resumed_s, 2), "identical": plain == checked == resumed,
            "load": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", nargs="+", choices=list(SETTINGS), default=["resnet20-w4"])
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--stop-after", type=int, default=5, help="units done before the stop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="append one JSON line per setting here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| setting | units | run s | with checkpoint s | writes s (ms/unit) | file MB | "
          "resumed after stop s | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in args.setting:
        row = run(setting, args)
        print(f"| {setting} ({row['num_calib']} images, {row['iters']} it) | {row['units']} | "
              f"{row['plain_s']} | {row['checkpoint_s']} | {row['writes_s']} "
              f"({row['write_ms_per_unit']}) | {row['file_mb']} | {row['resumed_s']} "
              f"(stopped after {row['stopped_after']}) | {row['identical']} |", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
