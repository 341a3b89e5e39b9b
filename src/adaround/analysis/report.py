"""Results of the ablation and the paper's first-layer table built from them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

METHODS = {
    "nearest": "nearest",
    "ceil": "ceil",
    "floor": "floor",
    "stochastic_best": "stochastic, best by calibration task loss",
    "qubo_task": "QUBO, task-loss Hessian",
    "qubo_local": "QUBO, local MSE",
    "relaxation": "continuous relaxation (AdaRound)",
}


@dataclass(frozen=True)
class MethodResult:
    """One rounding of the analysed layer and what it costs."""

    method: str
    accuracy: float  # top-1 % on the evaluation data, only this layer quantized
    task_loss: float  # mean cross-entropy on the calibration data
    task_qubo: float  # 1/2 e^T H e: the predicted increase of the task loss
    local_qubo: float  # E[(dW x)^2]: the layer's output MSE
    changed: float  # share of weights rounded differently from nearest
    seconds: float = 0.0  # time to find the rounding


def pearson(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def _ranks(values: list[float]) -> list[float]:
    """Ranks with ties averaged."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    return pearson(_ranks(a), _ranks(b))


@dataclass
class Ablation:
    """The first-layer ablation of one network at one bit width."""

    model: str
    layer: str
    bits: int
    weights: int
    fp_accuracy: float
    fp_task_loss: float
    methods: dict[str, MethodResult]
    stochastic: list[MethodResult]
    all_layers: dict[str, float] = field(default_factory=dict)  # method -> top-1 %
    settings: dict[str, Any] = field(default_factory=dict)

    def stochastic_summary(self) -> dict[str, float]:
        acc = [r.accuracy for r in self.stochastic]
        mean = sum(acc) / len(acc)
        std = math.sqrt(sum((a - mean) ** 2 for a in acc) / max(len(acc) - 1, 1))
        nearest = self.methods["nearest"].accuracy
        task = [r.task_qubo for r in self.stochastic]
        local = [r.local_qubo for r in self.stochastic]
        loss = [r.task_loss for r in self.stochastic]
        return {
            "samples": len(acc),
            "mean": mean,
            "std": std,
            "best_accuracy": max(acc),
            "beat_nearest": sum(a > nearest for a in acc),
            "pearson_task_qubo_accuracy": pearson(task, acc),
            "spearman_task_qubo_accuracy": spearman(task, acc),
            "pearson_local_qubo_accuracy": pearson(local, acc),
            "spearman_local_qubo_accuracy": spearman(local, acc),
            "pearson_task_qubo_task_loss": pearson(task, loss),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ablation:
        """Inverse of :meth:`to_dict` (the summary is recomputed)."""
        return cls(
            model=data["model"], layer=data["layer"], bits=data["bits"],
            weights=data["weights"], fp_accuracy=data["fp_accuracy"],
            fp_task_loss=data["fp_task_loss"],
            methods={k: MethodResult(**v) for k, v in data["methods"].items()},
            stochastic=[MethodResult(**r) for r in data["stochastic"]],
            all_layers=dict(data["all_layers"]), settings=dict(data["settings"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "layer": self.layer, "bits": self.bits,
            "weights": self.weights, "fp_accuracy": self.fp_accuracy,
            "fp_task_loss": self.fp_task_loss,
            "methods": {k: asdict(v) for k, v in self.methods.items()},
            "stochastic": [asdict(r) for r in self.stochastic],
            "stochastic_summary": self.stochastic_summary(),
            "all_layers": self.all_layers, "settings": self.settings,
        }


def _num(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def _row(label: str, r: MethodResult, all_layers: str) -> str:
    return (f"| {label} | {r.accuracy:.2f} | {_num(r.task_loss)} | {_num(r.task_qubo)} | "
            f"{_num(r.local_qubo)} | {100 * r.changed:.1f} | {all_layers} |")


def format_table(ab: Ablation) -> str:
    """The paper's first-layer table for one network and bit width, as markdown."""
    s = ab.stochastic_summary()
    n = s["samples"]
    mean = lambda key: sum(getattr(r, key) for r in ab.stochastic) / n  # noqa: E731
    all_acc = lambda key: (f"{ab.all_layers[key]:.2f}" if key in ab.all_layers  # noqa: E731
                           else "n/a")
    lines = [
        f"**{ab.model}, layer `{ab.layer}` ({ab.weights} weights), W{ab.bits}**",
        "",
        "| rounding of the layer | top-1 % | task loss | task-loss QUBO | local-MSE QUBO "
        "| % rounded unlike nearest | all layers: top-1 % |",
        "|---|---|---|---|---|---|---|",
        f"| FP32 | {ab.fp_accuracy:.2f} | {_num(ab.fp_task_loss)} | 0 | 0 | - | "
        f"{ab.fp_accuracy:.2f} |",
    ]
    for key in ("nearest", "ceil", "floor"):
        lines.append(_row(METHODS[key], ab.methods[key], all_acc(key)))
    lines.append(
        f"| stochastic, mean ± std of {n} | {s['mean']:.2f} ± {s['std']:.2f} | "
        f"{_num(mean('task_loss'))} | {_num(mean('task_qubo'))} | {_num(mean('local_qubo'))} | "
        f"{100 * mean('changed'):.1f} | - |")
    lines.append(_row(f"stochastic, best of {n} by calibration task loss",
                      ab.methods["stochastic_best"], "-"))
    lines.append(f"| stochastic, best of {n} by accuracy (oracle) | {s['best_accuracy']:.2f} "
                 "| | | | | - |")
    lines.append(f"| stochastic, samples beating nearest | {s['beat_nearest']} of {n} "
                 "| | | | | - |")
    for key in ("qubo_task", "qubo_local", "relaxation"):
        lines.append(_row(METHODS[key], ab.methods[key], all_acc(key)))
    lines += [
        "",
        f"Over the {n} stochastic samples, correlation with top-1: task-loss QUBO "
        f"Pearson {s['pearson_task_qubo_accuracy']:+.2f} / Spearman "
        f"{s['spearman_task_qubo_accuracy']:+.2f}; local-MSE QUBO Pearson "
        f"{s['pearson_local_qubo_accuracy']:+.2f} / Spearman "
        f"{s['spearman_local_qubo_accuracy']:+.2f}. Task-loss QUBO vs measured calibration "
        f"task loss: Pearson {s['pearson_task_qubo_task_loss']:+.2f}.",
    ]
    return "\n".join(lines)


def format_summary(ablations: list[Ablation]) -> str:
    """One compact table, a column per network and bit width (the paper's layout)."""
    heads = [f"{a.model} W{a.bits}" for a in ablations]
    lines = ["| approximation | " + " | ".join(heads) + " |",
             "|---|" + "---|" * len(heads)]
    lines.append("| FP32 | " + " | ".join(f"{a.fp_accuracy:.2f}" for a in ablations) + " |")
    for key in ("nearest", "ceil", "floor"):
        lines.append(f"| {METHODS[key]} | "
                     + " | ".join(f"{a.methods[key].accuracy:.2f}" for a in ablations) + " |")
    cells = []
    for a in ablations:
        s = a.stochastic_summary()
        cells.append(f"{s['mean']:.2f} ± {s['std']:.2f} (best {s['best_accuracy']:.2f}; "
                     f"{s['beat_nearest']}/{s['samples']} beat nearest)")
    lines.append("| stochastic | " + " | ".join(cells) + " |")
    for key in ("stochastic_best", "qubo_task", "qubo_local", "relaxation"):
        lines.append(f"| {METHODS[key]} | "
                     + " | ".join(f"{a.methods[key].accuracy:.2f}" for a in ablations) + " |")
    for key in ("nearest", "qubo_local", "relaxation"):
        cells = [f"{a.all_layers[key]:.2f}" if key in a.all_layers else "n/a" for a in ablations]
        lines.append(f"| all layers: {METHODS[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
