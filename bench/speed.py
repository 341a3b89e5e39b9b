"""Speed benchmark: this library against aimet-torch on the same network, data and iterations.

Each run is its own subprocess (so peak memory is per run), one after another in one
invocation, so the wall-time ratios are measured under the same machine load:

    python bench/speed.py --model resnet20 --bits 4 --grid tensor --num-calib 1024 \
        --iters 2000 --threads 2 --preset fast --json bench/results/speed.jsonl

Two ratios against aimet-torch: at equal settings (the plain API, `QuantConfig(weight_bits,
iters)`, as a user calls it: no allocator or thread setting beyond --threads), and with
`--preset fast` the time of `QuantConfig.fast()` against aimet's time to its accuracy (given
where the preset reaches at least aimet's top-1, else said).

aimet-torch runs from its throwaway venv (DEVELOPERS.md; `--aimet-python`, default
$ADAROUND_AIMET_PYTHON or /work/aimet-venv/bin/python) and is skipped, with a message, where
that venv is absent. `--scaling 256 512 ...` times this library against the calibration-set
size instead. Each of our runs also reports where its time went (per layer: data and moments,
optimisation steps, the rest) and the share of this machine's measured matmul throughput that
its optimisation steps reach.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_AIMET = os.environ.get("ADAROUND_AIMET_PYTHON", "/work/aimet-venv/bin/python")
log = logging.getLogger("bench.speed")


def matmul_gflops(seconds: float = 1.0) -> float:
    """This machine's float32 matmul throughput at the current thread count (best of shapes)."""
    best = 0.0
    for m, k, n in [(2048, 2048, 2048), (576, 8192, 576)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        best = max(best, 2 * m * k * n * runs / (time.perf_counter() - start) / 1e9)
    return best


def _layer_inputs(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict:
    from adaround.reconstruct.cache import layer_inputs

    return {n: layer_inputs(model, model.get_submodule(n), [x]) for n in names}


def step_flops(qmodel: torch.nn.Module, calib: torch.Tensor, batch_size: int) -> dict[str, int]:
    """FLOPs of one optimisation step of each reconstructed layer, by the loss it used."""
    from adaround.reconstruct.quadratic import step_costs

    report = {r.name: r for r in qmodel.adaround_report}
    inputs = _layer_inputs(qmodel, calib[:2], list(report))
    flops = {}
    for name, result in report.items():
        quadratic, sampled = step_costs(qmodel.get_submodule(name).layer, inputs[name],
                                        batch_size)
        flops[name] = 2 * (sampled if result.objective == "sampled" else quadratic)
    return flops


def run_ours(args: argparse.Namespace) -> dict:
    """One quantization in this process: accuracy, time, profile, peak memory."""
    sys.path.insert(0, str(BENCH))
    from bench_weights import load_cifar, load_effnet

    import adaround
    from adaround.evaluate import accuracy

    if args.model == "efficientnet_lite0":
        model, calib, x_eval, y_eval = load_effnet(args.num_calib, args.seed)
    else:
        model, calib, x_eval, y_eval = load_cifar(args.model, min(args.num_calib, 5000),
                                                  args.seed)
        if args.num_calib > len(calib):  # the pool holds 5000: add mirrored copies beyond it
            calib = torch.cat([calib, calib.flip(-1)])[:args.num_calib]
    options = dict(weight_bits=args.bits, per_channel=args.grid == "channel", seed=args.seed,
                   memory_budget_mb=args.memory_budget_mb, compile=args.compile)
    if args.preset == "fast":
        cfg = adaround.QuantConfig.fast(**options)
    else:
        cfg = adaround.QuantConfig(iters=args.iters, loss=args.loss,
                                   early_stop=not args.no_early_stop,
                                   **({"lr": args.lr} if args.lr else {}), **options)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    qmodel = adaround.quantize(model, calib, cfg)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    load = os.getloadavg()[0]
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    top1 = accuracy(qmodel, x_eval, y_eval)[1] if not args.no_eval else None
    layers = qmodel.adaround_report
    flops = step_flops(qmodel, calib, cfg.batch_size)
    step_seconds = sum(r.step_seconds for r in layers)
    achieved = sum(flops[r.name] * r.iters for r in layers) / max(step_seconds, 1e-9) / 1e9
    peak = matmul_gflops()
    return {
        "tool": "adaround", "version": adaround.__version__, "model": args.model,
        "bits": args.bits, "grid": args.grid, "num_calib": len(calib), "iters": cfg.iters,
        "preset": args.preset, "lr": cfg.lr, "moment_positions": cfg.moment_positions,
        "loss": cfg.loss, "early_stop": cfg.early_stop, "top1": top1,
        "memory_budget_mb": args.memory_budget_mb, "compile": args.compile,
        "seconds": seconds, "cpu_seconds": cpu_seconds, "load_average": load,
        "peak_rss_mb": rss_peak, "rss_before_mb": rss_before,
        "data_seconds": sum(r.data_seconds for r in layers), "step_seconds": step_seconds,
        "other_seconds": seconds - sum(r.data_seconds + r.step_seconds for r in layers),
        "steps_run": sum(r.iters for r in layers), "steps_max": len(layers) * cfg.iters,
        "step_gflops": achieved, "matmul_gflops": peak, "matmul_share": achieved / peak,
        "layers": [{"name": r.name, "objective": r.objective, "iters": r.iters,
                    "data_s": round(r.data_seconds, 3), "step_s": round(r.step_seconds, 3),
                    "total_s": round(r.seconds, 3),
                    "ms_per_step": round(1e3 * r.step_seconds / max(r.iters, 1), 3),
                    "gflop_per_step": flops[r.name] / 1e9} for r in layers],
    }


def _subprocess_json(cmd: list[str], env: dict[str, str]) -> dict | None:
    log.info("running: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        log.warning("failed (exit %d): %s", proc.returncode, proc.stderr.strip()[-2000:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_cmd(args: argparse.Namespace, num_calib: int, preset: str | None = None
                ) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", args.model,
           "--bits", str(args.bits), "--grid", args.grid, "--num-calib", str(num_calib),
           "--iters", str(args.iters), "--seed", str(args.seed), "--loss", args.loss]
    if args.lr:
        cmd += ["--lr", str(args.lr)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_early_stop:
        cmd.append("--no-early-stop")
    if args.no_eval:
        cmd.append("--no-eval")
    if args.memory_budget_mb is not None:
        cmd += ["--memory-budget-mb", str(args.memory_budget_mb)]
    if args.compile:
        cmd.append("--compile")
    if preset:
        cmd += ["--preset", preset]
    return cmd


def _aimet_cmd(args: argparse.Namespace) -> list[str] | None:
    python = Path(args.aimet_python)
    if not python.exists():
        print(f"aimet-torch skipped: no venv python at {python} (create it with "
              "`bash bench/aimet_venv.sh /work/aimet-venv`, see DEVELOPERS.md)")
        return None
    cmd = [str(python), str(BENCH / "aimet_adaround.py"), "--model", args.model,
           "--bits", str(args.bits),
           "--grid", args.grid, "--num-calib", str(args.num_calib), "--iters", str(args.iters),
           "--seed", str(args.seed)]
    return cmd + (["--threads", str(args.threads)] if args.threads else [])


def _env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _row(label: str, run: dict) -> str:
    budget = run["memory_budget_mb"]
    return (f"| {label}{f', budget {budget:g} MB' if budget else ''} | {_fmt(run['top1'])} | "
            f"{run['seconds']:.1f} | {run['peak_rss_mb']:.0f} (before quantize "
            f"{run['rss_before_mb']:.0f}) |")


def compare(args: argparse.Namespace) -> list[dict]:
    env = _env(args)
    load = [os.getloadavg()[0]]
    ours = _subprocess_json(_worker_cmd(args, args.num_calib), env)
    load.append(os.getloadavg()[0])
    fast = (_subprocess_json(_worker_cmd(args, args.num_calib, args.preset), env)
            if args.preset else None)
    load.append(os.getloadavg()[0])
    aimet_cmd = None if args.no_aimet else _aimet_cmd(args)
    aimet = _subprocess_json(aimet_cmd, env) if aimet_cmd else None
    load.append(os.getloadavg()[0])
    print(f"load average (1 min) before/between/after the runs: "
          f"{', '.join(f'{v:.2f}' for v in load)}")
    print("| tool | top-1 % | wall s | peak RSS MB |\n|---|---|---|---|")
    if ours:
        print(_row(f"adaround {ours['iters']} it. ({ours['loss']} loss)", ours))
    if fast:
        print(_row(f"adaround QuantConfig.{args.preset}() ({fast['iters']} it., lr "
                   f"{fast['lr']:g}, moments from <= {fast['moment_positions']} positions)",
                   fast))
    if aimet:
        print(f"| aimet-torch {aimet['version']} {aimet['iters']} it. | "
              f"{_fmt(aimet['adaround_top1'])} | {aimet['adaround_seconds']:.1f} | "
              f"{aimet['peak_rss_mb']:.0f} |")
    for run in (ours, fast):
        if run:
            run["load_between"] = load
    if ours and aimet:
        ratio = aimet["adaround_seconds"] / ours["seconds"]
        print(f"\nequal settings: {ratio:.1f}x (aimet {aimet['adaround_seconds']:.1f} s / ours "
              f"{ours['seconds']:.1f} s); accuracy {ours['top1'] - aimet['adaround_top1']:+.2f}"
              " points against aimet")
        ours["aimet"] = aimet
        ours["speedup_vs_aimet"] = ratio
    if fast and aimet:
        ratio = aimet["adaround_seconds"] / fast["seconds"]
        reached = fast["top1"] >= aimet["adaround_top1"]
        print(f"time to aimet's accuracy: {ratio:.1f}x (aimet {aimet['adaround_seconds']:.1f} s"
              f" / QuantConfig.{args.preset}() {fast['seconds']:.1f} s); preset "
              f"{fast['top1']:.2f} % vs aimet {aimet['adaround_top1']:.2f} %"
              + ("" if reached else ": NOT reached"))
        fast["aimet"] = aimet
        fast["speedup_to_aimet_accuracy"] = ratio if reached else None
    return [r for r in (ours, fast) if r]


def scaling(args: argparse.Namespace) -> list[dict]:
    env = _env(args)
    rows = []
    print("| calibration images | wall s | data+moments s | steps s | peak RSS MB |\n"
          "|---|---|---|---|---|")
    for n in args.scaling:
        row = _subprocess_json(_worker_cmd(args, n), env)
        if row:
            rows.append(row)
            print(f"| {n} | {row['seconds']:.1f} | {row['data_seconds']:.1f} | "
                  f"{row['step_seconds']:.1f} | {row['peak_rss_mb']:.0f} |", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["resnet20", "resnet56", "efficientnet_lite0"],
                   default="resnet20")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--grid", choices=["tensor", "channel"], default="tensor")
    p.add_argument("--num-calib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="Adam's lr for V (default: the config's, 1e-3)")
    p.add_argument("--loss", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-early-stop", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy (timing only)")
    p.add_argument("--memory-budget-mb", type=float, help="QuantConfig.memory_budget_mb")
    p.add_argument("--compile", action="store_true", help="QuantConfig.compile")
    p.add_argument("--aimet-python", default=DEFAULT_AIMET)
    p.add_argument("--no-aimet", action="store_true")
    p.add_argument("--preset", choices=["fast"], help="also time this QuantConfig preset "
                   "(in the worker: run it instead of the equal-settings config)")
    p.add_argument("--scaling", type=int, nargs="+", help="calibration-set sizes to time")
    p.add_argument("--json", type=Path, help="append one JSON line per run here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_ours(args)))
        return 0
    from adaround.data.files import data_root

    if not (data_root() / "cifar10").exists():
        print(f"skipped: no shared data under {data_root()} (set ADAROUND_DATA)")
        return 0
    rows = scaling(args) if args.scaling else compare(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    machine = (f"{platform.machine()} {os.cpu_count()} cores, {args.threads or 'default'} "
               f"threads, torch {torch.__version__}")
    for row in rows:
        print(f"\nprofile ({row['preset'] or 'equal settings'}, {row['num_calib']} images): "
              f"data+moments {row['data_seconds']:.1f} s,"
              f" steps {row['step_seconds']:.1f} s ({row['steps_run']}/{row['steps_max']} steps,"
              f" {row['step_gflops']:.1f} GFLOP/s = {100 * row['matmul_share']:.0f}% of "
              f"{row['matmul_gflops']:.0f} GFLOP/s matmul), rest {row['other_seconds']:.1f} s")
        row.update(commit=commit, machine=machine)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
