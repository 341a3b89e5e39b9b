"""The paper's first-layer ablation on ResNet-20 (CIFAR-10) and EfficientNet-Lite0 (ImageNet).

Writes bench/results/analysis.md (tables, settings, machine, and whether each of the paper's
qualitative findings holds), analysis.json (every number) and one QUBO-vs-accuracy scatter
PNG per network and bit width. A run of some --models keeps the other models' results from
the previous analysis.json, with their own command line. Reads the shared data from
$ADAROUND_DATA or ../shared/data and skips, with a message, what is absent.

    python bench/bench_analysis.py --threads 1
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

from adaround.allocator import keep_freed_memory
from adaround.analysis import Ablation, AnalysisConfig, analyze, format_summary, format_table
from adaround.analysis.plot import plot_qubo_vs_accuracy
from adaround.data.files import (
    data_root,
    imagenet_sample_split,
    list_image_files,
    load_array_file,
    split_image_files,
)

log = logging.getLogger("bench")
RESULTS = Path(__file__).parent / "results"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _subset(n: int, total: int, seed: int) -> torch.Tensor:
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def run_resnet20(args: argparse.Namespace) -> list[Ablation]:
    from adaround.models.cifar_resnet import CIFAR_MEAN, CIFAR_STD, resnet20

    root = data_root() / "cifar10"
    model = resnet20(root / "resnet20.th")
    pool, pool_y = load_array_file(root / "cifar10_train5k.npz", mean=CIFAR_MEAN, std=CIFAR_STD)
    pick = _subset(args.num_calib, len(pool), args.seed)
    x_test, y_test = load_array_file(root / "cifar10_test.npz", mean=CIFAR_MEAN, std=CIFAR_STD)
    keep = _subset(args.resnet_eval, len(x_test), args.seed + 1)  # the file is sorted by class
    cfg = AnalysisConfig(bits=tuple(args.resnet_bits), samples=args.resnet_samples,
                         hessian_samples=args.hessian_samples, task_samples=args.task_samples,
                         sweeps=args.sweeps, iters=args.iters, all_layers=True,
                         all_layers_iters=args.all_layers_iters, seed=args.seed)
    return analyze(model, pool[pick], x_test[keep], y_test[keep], cfg,
                   calib_labels=pool_y[pick], name="ResNet-20")


def run_effnet(args: argparse.Namespace) -> list[Ablation]:
    from adaround.models.efficientnet import (
        EFFICIENTNET_LITE_MEAN,
        EFFICIENTNET_LITE_STD,
        efficientnet_lite0,
    )

    root = data_root() / "imagenet-sample"
    model = efficientnet_lite0()
    x_calib, x_eval, y_eval = imagenet_sample_split(
        root, n_calib=200, seed=args.seed, mean=EFFICIENTNET_LITE_MEAN, std=EFFICIENTNET_LITE_STD)
    files, labels = list_image_files(root, "wnid")
    label_of = dict(zip(files, labels or []))
    calib_files, _, _ = split_image_files(root, 200, args.seed)
    calib_y = torch.tensor([label_of[f] for f in calib_files], dtype=torch.long)
    keep = _subset(args.effnet_eval, len(x_eval), args.seed + 1)
    cfg = AnalysisConfig(bits=tuple(args.effnet_bits), samples=args.effnet_samples,
                         hessian_samples=args.effnet_hessian_samples,
                         max_classes=args.effnet_max_classes,
                         task_samples=args.effnet_task_samples, sweeps=args.sweeps,
                         iters=args.effnet_iters, all_layers=False, eval_batch_size=8,
                         seed=args.seed)
    return analyze(model, x_calib, x_eval[keep], y_eval[keep], cfg, calib_labels=calib_y,
                   name="EfficientNet-Lite0")


def findings(a: Ablation) -> list[str]:
    """Each qualitative finding of the paper, checked on one ablation."""
    m, s = a.methods, a.stochastic_summary()
    near = m["nearest"].accuracy
    n = s["samples"]
    collapse = max(m["ceil"].accuracy, m["floor"].accuracy) < near - 10
    best = m["stochastic_best"].accuracy
    corr = s["spearman_task_qubo_accuracy"]
    lines = [
        f"- ceil/floor collapse: {'holds' if collapse else 'does not hold'} (ceil "
        f"{m['ceil'].accuracy:.2f}, floor {m['floor'].accuracy:.2f}, nearest {near:.2f}).",
        f"- best stochastic sample beats nearest: by calibration task loss "
        f"{'holds' if best > near else 'does not hold'} ({best:.2f} vs {near:.2f}); oracle best "
        f"{s['best_accuracy']:.2f}; {s['beat_nearest']} of {n} samples beat nearest "
        f"(mean {s['mean']:.2f} ± {s['std']:.2f}).",
        f"- QUBO value correlates with accuracy: task-loss QUBO Spearman {corr:+.2f}, local-MSE "
        f"QUBO {s['spearman_local_qubo_accuracy']:+.2f} over {n} samples "
        f"({'holds' if corr < -0.3 else 'weak or absent'}; negative = lower cost, higher "
        "accuracy).",
    ]
    beats = {k: m[k].accuracy - near for k in ("qubo_task", "qubo_local", "relaxation")}
    lines.append("- QUBO and relaxation beat nearest (first layer only): " + ", ".join(
        f"{k} {d:+.2f}" for k, d in beats.items())
        + f" ({'holds' if min(beats.values()) > 0 else 'does not hold for all'}).")
    if a.all_layers:
        al = a.all_layers
        lines.append(f"- all layers: nearest {al['nearest']:.2f}, local-MSE QUBO "
                     f"{al['qubo_local']:.2f}, relaxation {al['relaxation']:.2f} ("
                     f"{'both beat nearest' if min(al['qubo_local'], al['relaxation']) > al['nearest'] else 'not both above nearest'}).")  # noqa: E501
    return lines


def write_report(ablations: list[Ablation]) -> None:
    """analysis.md, analysis.json and the plots, from every ablation (this run and kept ones)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    plots = []
    for a in ablations:
        name = f"analysis_{a.model.lower().replace('-', '')}_w{a.bits}.png"
        plot_qubo_vs_accuracy(a, RESULTS / name, dpi=80)
        plots.append((a, name))
    (RESULTS / "analysis.json").write_text(json.dumps([a.to_dict() for a in ablations],
                                                      indent=1))
    lines = ["# The paper's first-layer ablation, measured", ""]
    runs = {}
    for a in ablations:
        runs.setdefault((a.settings["command"], a.settings["machine"]), []).append(a)
    for (cmd, machine), group in runs.items():
        minutes = group[0].settings["model_minutes"]
        lines += [f"- {group[0].model}: `{cmd}` ({minutes:.1f} min); {machine}."]
    lines.append("")
    for a in ablations:
        st = a.settings
        lines.append(
            f"- {a.model} W{a.bits} ({a.layer}, {a.weights} weights, symmetric per-tensor MSE "
            f"grid, BatchNorm folded): {st['calibration_samples']} calibration images, "
            f"{st['evaluation_samples']} evaluation images (seeded random subset; one image = "
            f"{100 / st['evaluation_samples']:.2f} points), task loss on "
            f"{st['task_loss_samples']} calibration images with labels; task-loss Hessian "
            f"{st['hessian']} on {min(st['hessian_samples'], st['calibration_samples'])} images"
            + (f" (top {st['max_classes']} classes per image)" if st["max_classes"] else
               " (all classes)")
            + f", rank {st['hessian_rank']} of {a.weights}, {st['hessian_seconds']:.0f}s; "
            f"{st['samples']} stochastic samples; QUBO "
            f"solver {st['sweeps']} annealing sweeps from nearest; relaxation {st['iters']} "
            "iterations, batch 32"
            + (f"; all layers: relaxation {st['all_layers_iters'] or st['iters']} iterations "
               f"per layer, QUBO {st['all_layers_sweeps']} sweeps" if st["all_layers"] else "")
            + ".")
    lines += ["", "## Summary (top-1 %, only the first layer quantized unless noted)", "",
              format_summary(ablations), ""]
    for a, plot in plots:
        lines += [f"## {a.model}, W{a.bits}", "", format_table(a), "", "Findings:", "",
                  *findings(a), "", f"![QUBO value vs accuracy]({plot})", ""]
    (RESULTS / "analysis.md").write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=["resnet20", "efficientnet_lite0"],
                   default=["resnet20", "efficientnet_lite0"])
    p.add_argument("--resnet-bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--effnet-bits", type=int, nargs="+", default=[4])
    p.add_argument("--num-calib", type=int, default=1024)
    p.add_argument("--resnet-eval", type=int, default=2000)
    p.add_argument("--resnet-samples", type=int, default=32)
    p.add_argument("--hessian-samples", type=int, default=512)
    p.add_argument("--task-samples", type=int, default=512)
    p.add_argument("--sweeps", type=int, default=200)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--all-layers-iters", type=int, default=1000)
    p.add_argument("--effnet-eval", type=int, default=300)
    p.add_argument("--effnet-samples", type=int, default=24)
    p.add_argument("--effnet-hessian-samples", type=int, default=200)
    p.add_argument("--effnet-max-classes", type=int, default=8)
    p.add_argument("--effnet-task-samples", type=int, default=64)
    p.add_argument("--effnet-iters", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("adaround.evaluate").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    machine = (f"{_cpu_name()} ({platform.machine()}, {os.cpu_count()} cores, shared with other "
               f"jobs), {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    cmd = "python bench/bench_analysis.py " + " ".join(sys.argv[1:])
    ablations: list[Ablation] = []
    runners = {"resnet20": run_resnet20, "efficientnet_lite0": run_effnet}
    for model in args.models:
        start = time.perf_counter()
        try:
            results = runners[model](args)
        except (FileNotFoundError, ImportError) as exc:
            print(f"skipped {model}: {exc}")
            continue
        minutes = (time.perf_counter() - start) / 60
        for a in results:
            a.settings.update(command=cmd, machine=machine, model_minutes=minutes)
            print(format_table(a) + "\n", flush=True)
        ablations += results
    if ablations:
        ablations = _keep_other_models(ablations)
        write_report(ablations)
        print(format_summary(ablations))
    return 0


def _keep_other_models(ablations: list[Ablation]) -> list[Ablation]:
    """Add the results of models this run did not measure from the previous analysis.json."""
    path = RESULTS / "analysis.json"
    done = {a.model for a in ablations}
    if path.exists():
        kept = [Ablation.from_dict(d) for d in json.loads(path.read_text())]
        ablations = ablations + [a for a in kept if a.model not in done]
    order = {"ResNet-20": 0, "EfficientNet-Lite0": 1}
    return sorted(ablations, key=lambda a: (order.get(a.model, 9), -a.bits))


if __name__ == "__main__":
    sys.exit(main())
