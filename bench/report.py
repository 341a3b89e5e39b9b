"""Turn the JSON lines written by bench_weights.py into BENCHMARKS.md's markdown tables.

    python bench/report.py bench/results/weights.jsonl [more.jsonl ...]

The latest run of each (model, bits, grid, rounding) wins.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = {"resnet20": 0, "resnet56": 1, "efficientnet_lite0": 2}


def load(path: Path) -> list[dict]:
    latest: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            run = json.loads(line)
            ada = run["rounding"] == "adaround"
            key = (run["model"], run["bits"], run["grid"], run["rounding"],
                   run.get("loss", "sampled") if ada else "-", run["iters"] if ada else 0)
            latest[key] = run
    return sorted(latest.values(), key=lambda r: (
        ORDER.get(r["model"], 9), -r["bits"], r["grid"] != "tensor", r["rounding"] != "nearest"))


def table(runs: list[dict]) -> str:
    lines = ["| model | weights | grid | rounding | top-1 % | FP top-1 % | delta | time s | "
             "calib | iters | loss | eval | commit |", "|" + "---|" * 13]
    for r in runs:
        delta = r["top1"] - r["fp_top1"]
        lines.append(
            f"| {r['model']} | W{r['bits']} | per-{r['grid']} | {r['rounding']} | "
            f"{r['top1']:.2f} | {r['fp_top1']:.2f} | {delta:+.2f} | {r['seconds']:.0f} | "
            f"{r['num_calib']} | {r['iters'] if r['rounding'] == 'adaround' else '-'} | "
            f"{r.get('loss', 'sampled') if r['rounding'] == 'adaround' else '-'} | "
            f"{r['eval_samples']} | {r.get('commit', '-')} |")
    return "\n".join(lines)


def main() -> int:
    paths = [Path(p) for p in sys.argv[1:]] or [Path("bench/results/weights.jsonl")]
    print(table([run for path in paths for run in load(path)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
