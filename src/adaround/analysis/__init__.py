"""The paper's analysis, runnable: rounding as a QUBO, stochastic rounding, the ablation table.

Example:
    >>> from adaround.analysis import AnalysisConfig, analyze, format_table
    >>> cfg = AnalysisConfig(bits=(4, 3))
    >>> ablations = analyze(model, calib, x_test, y_test, cfg)  # doctest: +SKIP
    >>> print(format_table(ablations[0]))  # doctest: +SKIP
"""

from adaround.analysis.config import AnalysisConfig
from adaround.analysis.grid import RoundingGrid
from adaround.analysis.hessian import HESSIANS, task_loss, task_loss_hessian
from adaround.analysis.qubo import Qubo, input_second_moments, local_mse_qubo, qubo_from_hessian
from adaround.analysis.report import Ablation, MethodResult, format_summary, format_table
from adaround.analysis.runner import analyze
from adaround.analysis.solvers import anneal, exhaustive, local_search, relaxation

__all__ = [
    "HESSIANS",
    "Ablation",
    "AnalysisConfig",
    "MethodResult",
    "Qubo",
    "RoundingGrid",
    "analyze",
    "anneal",
    "exhaustive",
    "format_summary",
    "format_table",
    "input_second_moments",
    "local_mse_qubo",
    "local_search",
    "qubo_from_hessian",
    "relaxation",
    "task_loss",
    "task_loss_hessian",
]
