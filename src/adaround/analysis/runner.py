"""The paper's first-layer ablation on any network: every rounding method on one layer.

For the analysed layer (default: the first in execution order) and each bit width, only that
layer is quantized, on one fixed grid, with: nearest, ceil, floor, N stochastic samples, the
task-loss QUBO and the local-MSE QUBO (both solved by annealing from nearest), and the
continuous relaxation of the local MSE (the core's optimisation, eq. 21 without activation).
Each rounding is scored by its top-1 on the evaluation data, its task loss on the calibration
data and both QUBO values. Optionally every layer is then rounded layer-wise with the local-MSE
QUBO and with the relaxation (:mod:`adaround.analysis.layerwise`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from adaround.analysis.config import AnalysisConfig
from adaround.analysis.grid import RoundingGrid
from adaround.analysis.hessian import soft_targets, task_loss, task_loss_hessian
from adaround.analysis.layerwise import layer_inputs, layer_outputs, quantize_layerwise
from adaround.analysis.qubo import Qubo, input_second_moments, local_mse_qubo, qubo_from_hessian
from adaround.analysis.report import Ablation, MethodResult
from adaround.analysis.solvers import anneal, relaxation
from adaround.api import prepare_float
from adaround.calibration import check_finite_weights, collect_calibration
from adaround.config import short_run_note
from adaround.errors import CalibrationDataError, ConfigError, ModelError
from adaround.evaluate import predictions
from adaround.nn.quant_layer import QuantLayer
from adaround.prepare import LayerPlan, plan_layers, swap_in_quant_layers

log = logging.getLogger(__name__)


def top1(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 32) -> float:
    """Top-1 accuracy in percent (quietly: this runs hundreds of times)."""
    hits = predictions(model, x, batch_size) == y.reshape(-1).cpu()
    return 100.0 * float(hits.double().mean())


class _Scorer:
    """Scores choices of the analysed layer inside a model where only it is quantized."""

    def __init__(self, qmodel: nn.Module, qlayer: QuantLayer, grid: RoundingGrid,
                 qubos: dict[str, Qubo], data: dict[str, Any]) -> None:
        self.qmodel, self.qlayer, self.grid, self.qubos, self.data = (
            qmodel, qlayer, grid, qubos, data)
        self.nearest = grid.nearest()

    def __call__(self, method: str, up: Tensor, seconds: float = 0.0) -> MethodResult:
        up = up.reshape(self.grid.weight.shape).to(self.grid.weight.device)
        self.qlayer.set_codes(self.grid.codes(up))
        d = self.data
        return MethodResult(
            method=method,
            accuracy=top1(self.qmodel, d["x_eval"], d["y_eval"], d["batch"]),
            task_loss=task_loss(self.qmodel, d["x_task"], d["labels"], d["targets"],
                                d["batch"]),
            task_qubo=float(self.qubos["task"].value(up)),
            local_qubo=float(self.qubos["local"].value(up)),
            changed=float((self.grid.codes(up) != self.grid.codes(self.nearest)).double().mean()),
            seconds=seconds,
        )


def _timed(fn: Callable[..., Tensor], *args: Any) -> tuple[Tensor, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _pick_plan(plans: list[LayerPlan], name: str | None) -> LayerPlan:
    executed = [p for p in plans if p.info is not None]
    if name is None:
        if not executed:
            raise ModelError("no quantizable layer is called in the forward pass")
        plan = executed[0]
    else:
        found = [p for p in plans if p.name == name]
        if not found:
            names = ", ".join(p.name for p in executed[:12])
            raise ConfigError(f"layer={name!r} is not a quantizable layer of the model; "
                              f"choose one of: {names}")
        plan = found[0]
    if not plan.reconstructable:
        raise ModelError(f"layer {plan.name} is called {plan.info.calls if plan.info else 0} "
                         "times per forward pass: analyse a layer called exactly once")
    return plan


def analyze(
    model: nn.Module,
    calib: Any,
    x_eval: Tensor,
    y_eval: Tensor,
    config: AnalysisConfig | None = None,
    *,
    calib_labels: Tensor | None = None,
    name: str | None = None,
) -> list[Ablation]:
    """Run the first-layer ablation; one :class:`Ablation` per bit width.

    The task loss is the cross-entropy against `calib_labels`, or, without labels, against
    the FP model's own probabilities.

    Example:
        >>> cfg = AnalysisConfig(bits=(4,), samples=8, iters=100, all_layers=False)
        >>> ablations = analyze(net, calib, x_test, y_test, cfg)  # doctest: +SKIP
        >>> print(format_table(ablations[0]))  # doctest: +SKIP
    """
    cfg = config or AnalysisConfig()
    if (note := short_run_note(cfg.quant_config(cfg.bits[0]))) is not None:
        log.warning("relaxation: %s (--lr)", note)
    check_finite_weights(model)
    x = collect_calibration(calib)
    if calib_labels is not None and len(calib_labels) != len(x):
        raise CalibrationDataError(f"{len(calib_labels)} calibration labels for {len(x)} "
                                   "samples: pass one label per sample or none")
    generator = torch.Generator().manual_seed(cfg.seed)
    fp, trace, _ = prepare_float(model, x, cfg.quant_config(cfg.bits[0]))
    plans = plan_layers(fp, trace, cfg.quant_config(cfg.bits[0]))
    plan = _pick_plan(plans, cfg.layer)
    layer = fp.get_submodule(plan.name)
    n_task = cfg.task_samples or len(x)
    labels = None if calib_labels is None else calib_labels[:n_task]
    data = {"x_eval": x_eval, "y_eval": y_eval, "x_task": x[:n_task], "labels": labels,
            "targets": None if labels is not None else soft_targets(
                fp, x[:n_task], cfg.eval_batch_size),
            "batch": cfg.eval_batch_size}
    start = time.perf_counter()
    fp_acc = top1(fp, x_eval, y_eval, cfg.eval_batch_size)
    _log_estimate(cfg, len(x_eval), time.perf_counter() - start)
    fp_loss = task_loss(fp, data["x_task"], labels, data["targets"], cfg.eval_batch_size)
    log.info("%s: FP top-1 %.2f%%, task loss %.4g; analysing %s (%d weights)",
             name or type(model).__name__, fp_acc, fp_loss, plan.name, layer.weight.numel())

    x_layer = layer_inputs(fp, plan.name, x)
    target = layer_outputs(layer, x_layer)
    moments = input_second_moments(layer, x_layer)
    start = time.perf_counter()
    hessian = task_loss_hessian(
        fp, plan.name, x[: cfg.hessian_samples], kind=cfg.hessian,
        labels=None if calib_labels is None else calib_labels[: cfg.hessian_samples],
        max_classes=cfg.max_classes, batch_size=cfg.batch_size, generator=generator,
        max_dense=cfg.max_dense)
    hessian_seconds = time.perf_counter() - start
    # a rank below the weight count leaves directions the QUBO sees as free
    hessian_rank = int(torch.linalg.matrix_rank(hessian, hermitian=True))
    log.info("task-loss Hessian (%s, %d samples, rank %d of %d) in %.1fs", cfg.hessian,
             min(cfg.hessian_samples, len(x)), hessian_rank, len(hessian), hessian_seconds)

    layerwise: dict[int, dict[str, nn.Module]] = {}
    if cfg.all_layers:
        layerwise = quantize_layerwise(fp, plans, x, cfg, generator)

    ctx = {"fp": fp, "plan": plan, "cfg": cfg, "generator": generator, "data": data,
           "x_layer": x_layer, "target": target, "moments": moments, "hessian": hessian}
    ablations = []
    for bits in cfg.bits:
        methods, stochastic, grid = _ablate(bits, ctx)
        all_layers = {m: top1(q, x_eval, y_eval, cfg.eval_batch_size)
                      for m, q in layerwise.get(bits, {}).items()}
        settings = {**cfg.to_dict(), "bits": bits, "calibration_samples": len(x),
                    "evaluation_samples": len(x_eval), "task_loss_samples": n_task,
                    "task_loss_labels": labels is not None, "hessian_seconds": hessian_seconds,
                    "hessian_rank": hessian_rank}
        ablations.append(Ablation(
            model=name or type(model).__name__, layer=plan.name, bits=bits,
            weights=grid.numel, fp_accuracy=fp_acc, fp_task_loss=fp_loss, methods=methods,
            stochastic=stochastic, all_layers=all_layers, settings=settings))
        log.info("W%d: nearest %.2f%%, task QUBO %.2f%%, local QUBO %.2f%%, relaxation %.2f%%",
                 bits, methods["nearest"].accuracy, methods["qubo_task"].accuracy,
                 methods["qubo_local"].accuracy, methods["relaxation"].accuracy)
    return ablations


def _log_estimate(cfg: AnalysisConfig, n_eval: int, seconds: float) -> None:
    """The run is mostly evaluations: say how many, and how long they take, up front."""
    per_bits = cfg.samples + 6  # stochastic samples, nearest, ceil, floor, 2 QUBOs, relaxation
    evaluations = len(cfg.bits) * per_bits
    log.info("one evaluation on %d samples takes %.1f s; the ablation runs %d of them (%d "
             "bit width(s) x (%d stochastic roundings + 6 methods)): about %.0f min, plus the "
             "Hessian and the relaxation%s; --samples and --num-eval shorten it", n_eval,
             seconds, evaluations, len(cfg.bits), cfg.samples, evaluations * seconds / 60,
             " and the all-layers runs (--no-all-layers skips them)" if cfg.all_layers else "")


def _ablate(bits: int, ctx: dict[str, Any]
            ) -> tuple[dict[str, MethodResult], list[MethodResult], RoundingGrid]:
    """Every rounding method on the analysed layer at one bit width."""
    cfg: AnalysisConfig = ctx["cfg"]
    plan: LayerPlan = ctx["plan"]
    generator = ctx["generator"]
    qcfg = cfg.quant_config(bits)
    qmodel = swap_in_quant_layers(copy.deepcopy(ctx["fp"]),
                                  [LayerPlan(plan.name, bits, plan.info)], qcfg)
    qlayer = qmodel if not plan.name else qmodel.get_submodule(plan.name)
    assert isinstance(qlayer, QuantLayer)
    grid = RoundingGrid.of(qlayer)
    qubos = {"task": qubo_from_hessian(ctx["hessian"], grid),
             "local": local_mse_qubo(ctx["moments"], grid, cfg.max_dense)}
    score = _Scorer(qmodel, qlayer, grid, qubos, ctx["data"])
    nearest = grid.nearest()
    methods = {"nearest": score("nearest", nearest), "ceil": score("ceil", grid.ceil()),
               "floor": score("floor", grid.floor_choice())}
    for key, qubo in (("qubo_task", qubos["task"]), ("qubo_local", qubos["local"])):
        up, secs = _timed(anneal, qubo, nearest.reshape(qubo.rows, -1), cfg.sweeps, generator)
        methods[key] = score(key, up, secs)
    up, secs = _timed(relaxation, qlayer, ctx["x_layer"], ctx["target"], None, qcfg, generator)
    methods["relaxation"] = score("relaxation", up, secs)
    stochastic = []
    start, every = time.perf_counter(), max(1, cfg.samples // 10)
    for i, up in enumerate(grid.stochastic(cfg.samples, generator), 1):
        stochastic.append(score("stochastic", up))
        if i % every == 0 and i < cfg.samples:
            spent = time.perf_counter() - start
            log.info("W%d: %d of %d stochastic roundings scored, about %.0f s left", bits, i,
                     cfg.samples, spent / i * (cfg.samples - i))
    methods["stochastic_best"] = min(stochastic, key=lambda r: r.task_loss)
    return methods, stochastic, grid
