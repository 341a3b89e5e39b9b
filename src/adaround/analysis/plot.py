"""The paper's Figure 1: QUBO value against accuracy over stochastic roundings (needs matplotlib).

Drawn on a bare matplotlib Figure with the Agg canvas, so no pyplot state or backend setting
is changed in the caller's process.
"""

from __future__ import annotations

from pathlib import Path

from adaround.analysis.report import METHODS, Ablation, pearson

_MARKED = (("nearest", "o", "tab:red"), ("qubo_task", "s", "tab:blue"),
           ("qubo_local", "D", "tab:green"), ("relaxation", "^", "tab:purple"))
_AXES = (("task_qubo", "task-loss QUBO  ½ Δwᵀ H Δw"),
         ("local_qubo", "local-MSE QUBO  E[(ΔW x)²]"))


def plot_qubo_vs_accuracy(ablation: Ablation, path: str | Path, dpi: int = 100) -> Path:
    """Scatter the stochastic samples (and the named methods) as QUBO value vs top-1; save PNG.

    Ceil and floor are left out: their QUBO values are orders of magnitude off the scale.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the plot needs matplotlib: pip install 'adaround[plots]'") from exc
    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    acc = [r.accuracy for r in ablation.stochastic]
    for ax, (key, label) in zip(axes, _AXES):
        values = [getattr(r, key) for r in ablation.stochastic]
        ax.scatter(values, acc, s=14, c="0.55", label=f"stochastic ({len(acc)} samples)")
        for method, marker, color in _MARKED:
            r = ablation.methods[method]
            ax.scatter([getattr(r, key)], [r.accuracy], marker=marker, s=55, c=color,
                       edgecolors="black", linewidths=0.6, label=METHODS[method], zorder=3)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 % (only this layer quantized)")
        ax.set_title(f"stochastic samples: Pearson r = {pearson(values, acc):+.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{ablation.model}, {ablation.layer}, W{ablation.bits}: rounding vs accuracy",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
