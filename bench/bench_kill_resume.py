"""SIGKILL in the middle of a unit, through the command line, then resume: the saved file must
equal an uninterrupted run's, byte for byte.

Runs `adaround quantize` on ResNet-20 with --checkpoint, kills it with SIGKILL a moment after
`--kill-after` units are done (so the kill lands inside the next unit), runs the same command
again to the end, and compares its output with an uninterrupted run of the same command.

    OMP_NUM_THREADS=1 python bench/bench_kill_resume.py --kill-after 3 8 -- --bits 4 --iters 500
    OMP_NUM_THREADS=1 python bench/bench_kill_resume.py --kill-after 2 6 -- --bits 4 \
        --act-bits 4 --method qdrop --first-last-bits 8 --first-last-act-bits 8 --iters 200
    OMP_NUM_THREADS=1 python bench/bench_kill_resume.py --processes 2 --kill-after 3 8 -- \
        --bits 4 --iters 300 --lr 0.01

With `--processes N` the killed and resumed runs go through torchrun (N processes of one
thread, all killed at once, as a crashed machine) and the reference is one process: the
quadratic path's file is then byte-identical too.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adaround.data.files import data_root

SRC = Path(__file__).resolve().parent.parent / "src"


def _descendants(pid: int) -> list[int]:
    """The processes started by `pid`, at any depth (torchrun starts its workers in sessions
    of their own, so killing torchrun's process group leaves them running)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def _units_done(folder: Path) -> int:
    try:
        return len(torch.load(folder / "progress.pt", weights_only=False)["done"])
    except Exception:
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kill-after", type=int, nargs="+", default=[3],
                   help="kill once this many units are done (one kill per value, in order)")
    p.add_argument("--delay", type=float, default=0.5, help="seconds into the next unit")
    p.add_argument("--processes", type=int, default=1,
                   help="run the killed and resumed runs under torchrun on this many processes")
    p.add_argument("options", nargs="*", help="quantize options after --")
    args = p.parse_args()
    root = data_root() / "cifar10"
    work = Path(tempfile.mkdtemp(prefix="bench-kill-"))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}

    def command(out: str, folder: str, processes: int = 1) -> list[str]:
        launcher = [sys.executable, "-m", "adaround"] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
            str(processes), "--master-addr", "127.0.0.1", "--master-port", str(29500 + os.getpid()
                                                                                % 1000),
            "-m", "adaround"]
        return [*launcher, "-q", "--threads", "1", "quantize",
                "adaround.models.cifar_resnet:resnet20", "--weights", str(root / "resnet20.th"),
                "--calib", str(root / "cifar10_train5k.npz"), "--num-calib", "256",
                "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                "--checkpoint", str(work / folder), "-o", str(work / out), *args.options]

    start = time.perf_counter()
    subprocess.run(command("reference.pt", "ck-ref"), env=env, check=True)
    reference_s = time.perf_counter() - start
    folder = work / "ck"
    kills = []
    for units in args.kill_after:
        proc = subprocess.Popen(command("resumed.pt", "ck", args.processes), env=env)
        while _units_done(folder) < units:
            if proc.poll() is not None:
                raise SystemExit(f"the run ended before {units} units were done")
            time.sleep(0.05)
        time.sleep(args.delay)
        for pid in [proc.pid, *_descendants(proc.pid)]:  # all at once: a crashed machine
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        kills.append(f"SIGKILL {args.delay}s after unit {units} (rc {proc.returncode}, "
                     f"checkpoint holds {_units_done(folder)})")
    start = time.perf_counter()
    subprocess.run(command("resumed.pt", "ck", args.processes), env=env, check=True)
    last_s = time.perf_counter() - start
    same = [hashlib.sha256((work / n).read_bytes()).hexdigest()
            for n in ("reference.pt", "resumed.pt")]
    print(f"options: {' '.join(args.options)}; killed and resumed on {args.processes} "
          "process(es), reference on 1")
    print(f"uninterrupted run: {reference_s:.1f}s; " + "; ".join(kills)
          + f"; last resumed run {last_s:.1f}s")
    print(f"byte-identical: {same[0] == same[1]} (sha256 {same[0][:16]})")
    leftovers = [p.name for p in work.iterdir() if p.name.endswith(".tmp")]
    print(f"leftover .tmp files: {leftovers or 'none'}; load {os.getloadavg()[0]:.1f}")
    return 0 if same[0] == same[1] else 1


if __name__ == "__main__":
    sys.exit(main())
