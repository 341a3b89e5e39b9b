"""`quantize`: the whole pipeline of the paper, one layer after another in execution order."""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from adaround import input_stats
from adaround.act_calibration import calibrate_activations, describe_convention
from adaround.act_config import uses_unit_loop
from adaround.calibration import check_finite_weights, collect_calibration, model_device
from adaround.checkpoint import Checkpoint
from adaround.checks import check_config, check_model
from adaround.config import QuantConfig, short_run_note
from adaround.errors import CalibrationDataError
from adaround.guards import check_finite, check_input_scale, check_result, open_checkpoint
from adaround.nn.act_quant import act_note, act_quant_spec, quantize_layer_input
from adaround.nn.quant_layer import QuantLayer
from adaround.prepare import LayerPlan, fold_batchnorms, plan_layers, swap_in_quant_layers
from adaround.reconstruct import LayerResult, adaround_layer
from adaround.reconstruct.batched import round_stacked
from adaround.reconstruct.quadratic import (
    Moments,
    UnfoldError,
    accumulate_moments,
    step_costs,
    supports_quadratic,
)
from adaround.reconstruct.spill import budget_store, materialize
from adaround.reconstruct.stream import GraphEngine, RerunEngine, make_engine
from adaround.reconstruct.units import round_units
from adaround.trace import Trace, trace_model

log = logging.getLogger(__name__)

FORWARD_BATCH = 128
META_ATTR = "adaround_meta"
REPORT_ATTR = "adaround_report"


def _trace(model: nn.Module, x: Tensor) -> Trace:
    try:
        return trace_model(model, x[:2])
    except Exception as exc:  # the model's own error, re-raised with the input that caused it
        raise CalibrationDataError(
            f"the model rejected calibration inputs of shape {tuple(x[:2].shape)} "
            f"({type(exc).__name__}: {exc}); pass inputs shaped and preprocessed as the model "
            "expects them"
        ) from exc


def prepare_float(model: nn.Module, x: Tensor, cfg: QuantConfig) -> tuple[nn.Module, Trace, dict]:
    """Eval-mode copy of `model` with BatchNorm folded, and its trace."""
    fp = copy.deepcopy(model).eval()
    trace = _trace(fp, x)
    folded = fold_batchnorms(fp, trace) if cfg.fold_bn else {}
    if folded:
        trace = _trace(fp, x)
    return fp, trace, folded


def quantize(
    model: nn.Module, calib: Any, config: QuantConfig | None = None, *, progress: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Quantize `model`'s weights with AdaRound (or nearest rounding) and return a new module.

    With `config.act_bits`, every quantized layer's input is fake-quantized too, and the
    reconstruction unit (layer or block), QDrop and learned activation steps follow the config
    (BRECQ and QDrop are `method="brecq"` / `"qdrop"`).

    `checkpoint_dir`: after each layer or block, the progress goes there; a run killed and
    started again with the same arguments continues where it stopped, with the same result
    (adaround.checkpoint). Other model, data or options in the folder are refused.

    Example:
        >>> cfg = QuantConfig(weight_bits=4, iters=10)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
        >>> qnet = quantize(net, torch.randn(64, 3, 6, 6), cfg)
    """
    cfg = check_config(config)
    check_model(model)
    if (note := short_run_note(cfg)) is not None:
        log.warning("%s", note)
    check_finite_weights(model)
    device = model_device(model)
    x = collect_calibration(calib).to(device)
    if cfg.rounding == "adaround" and x.shape[0] < cfg.batch_size:
        raise CalibrationDataError(
            f"calibration data has {x.shape[0]} samples, fewer than batch_size={cfg.batch_size}: "
            "pass more samples (hundreds) or lower batch_size"
        )
    check_input_scale(x)
    checkpoint = open_checkpoint(checkpoint_dir, model, x, cfg)
    fp, trace, folded = prepare_float(model, x, cfg)
    plans = plan_layers(fp, trace, cfg)
    qmodel = swap_in_quant_layers(copy.deepcopy(fp), plans, cfg)
    if cfg.act_bits is not None:
        calibrate_activations(qmodel, [p.name for p in plans], trace.names(), x, cfg)
        log.info("%s", describe_convention(cfg, trace.names()))
    if cfg.rounding == "adaround" and uses_unit_loop(cfg):  # blocks, QDrop, learned steps
        report = round_units(fp, qmodel, trace, plans, x, cfg, progress, checkpoint)
    else:
        report = _round_layers(fp, qmodel, plans, x, cfg, progress, checkpoint)
    qmodel.eval()
    setattr(qmodel, META_ATTR, {
        "config": cfg.to_dict(),
        "folded": folded,
        "layers": {p.name: p.bits for p in plans},
        "act_quant": act_quant_spec(qmodel),  # {layer: {bits, signed}}; scales in the state
        input_stats.KEY: input_stats.describe(x),  # for evaluate's warnings
    })
    setattr(qmodel, REPORT_ATTR, report)
    return qmodel


def _round_to_nearest(qmodel: nn.Module, plans: list[LayerPlan]) -> None:
    for plan in plans:
        qlayer = qmodel.get_submodule(plan.name)
        qlayer.set_codes(qlayer.nearest_codes())


def _layer_moments(engine: GraphEngine | RerunEngine, name: str, qlayer: QuantLayer,
                   x: Tensor, cfg: QuantConfig) -> Moments | None:
    """The moments of the layer's inputs where cfg.loss asks for them and the layer allows
    (for "auto": where a quadratic step costs less than a sampled one)."""
    if cfg.loss == "sampled":
        return None
    if not supports_quadratic(qlayer.layer):
        log.info("%s: the quadratic loss does not unfold %s; using the sampled loss", name,
                 type(qlayer.layer).__name__)
        return None
    try:
        if cfg.loss == "auto":
            quadratic_cost, sampled_cost = step_costs(qlayer.layer, materialize(x[:1]),
                                                      cfg.batch_size)
            if quadratic_cost >= sampled_cost:
                return None
        chunks = ((quantize_layer_input(qlayer, xq), xf) for xq, xf in engine.input_chunks(name))
        return accumulate_moments(qlayer.layer, chunks)
    except UnfoldError as exc:
        log.info("%s: %s; using the sampled loss", name, exc)
        return None


def _describe(result: LayerResult, cfg: QuantConfig, plan: LayerPlan) -> str:
    """The loss optimised and the steps run, for the per-layer log line."""
    steps = f"{result.iters}/{cfg.iters} steps"
    before = plan.info.activation_name if plan.info is not None else None
    before = f" before {before}" if before and cfg.loss_after_activation else ""
    if result.objective == "quadratic":
        return f"{steps} on the quadratic loss{before}"
    if result.objective == "quadratic_warmup":
        return f"{steps}, warm start on the quadratic loss{before}"
    return steps


def _round_layers(
    fp: nn.Module,
    qmodel: nn.Module,
    plans: list[LayerPlan],
    x: Tensor,
    cfg: QuantConfig,
    progress: bool,
    checkpoint: Checkpoint,
) -> list[LayerResult]:
    if cfg.rounding == "nearest":
        _round_to_nearest(qmodel, plans)
        return []
    names = [p.name for p in plans if p.reconstructable]
    with budget_store(cfg.memory_budget_mb) as store:
        # inputs="float": both streams are the FP network, and the layers are independent
        source = fp if cfg.inputs == "float" else qmodel
        engine = make_engine(fp, source, list(x.split(FORWARD_BATCH)), names, store)
        return _reconstruct_each(engine, qmodel, plans, cfg, progress, checkpoint)


def _reconstruct_each(engine: GraphEngine | RerunEngine, qmodel: nn.Module,
                      plans: list[LayerPlan], cfg: QuantConfig,
                      progress: bool, checkpoint: Checkpoint) -> list[LayerResult]:
    """AdaRound every planned layer in execution order (nearest where it cannot)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    report: list[LayerResult] = checkpoint.restore(qmodel, generator)
    stacked: list[tuple[str, QuantLayer, Moments]] = []
    for plan in tqdm(plans, desc="layers", unit="layer", disable=not progress):
        if plan.info is None or not plan.reconstructable:
            _round_to_nearest(qmodel, [plan])
            continue
        if plan.name in checkpoint.done:
            continue
        start = time.perf_counter()
        activation = plan.info.activation if cfg.loss_after_activation else None
        qlayer = qmodel.get_submodule(plan.name)
        xq, target = engine.layer_data(plan.name, activation)
        xq = quantize_layer_input(qlayer, xq)  # x^ includes the layer's activation grid
        check_finite(plan.name, "inputs", xq)
        check_finite(plan.name, "FP outputs (targets)", target)
        moments = _layer_moments(engine, plan.name, qlayer, xq, cfg)
        if cfg.inputs == "float" and moments is not None and cfg.loss in ("auto", "quadratic"):
            stacked.append((plan.name, qlayer, moments))  # rounded below, with its likes
            continue
        result = adaround_layer(plan.name, qlayer, xq, target, activation, cfg, generator,
                                progress, start, moments)
        del xq, target, moments
        check_result(result.name, result.loss_nearest, result.loss_adaround)
        report.append(result)
        checkpoint.record([plan.name], qmodel, generator, report)
        _log_layer(result, plan, qlayer, cfg, activation is not None)
    by_name = {p.name: p for p in plans}
    stacked_results = round_stacked(stacked, cfg, progress)
    for result in stacked_results:
        check_result(result.name, result.loss_nearest, result.loss_adaround)
        report.append(result)
        qlayer = qmodel.get_submodule(result.name)
        _log_layer(result, by_name[result.name], qlayer, cfg, False)
    if stacked_results:
        checkpoint.record([r.name for r in stacked_results], qmodel, generator, report)
    order = {p.name: i for i, p in enumerate(plans)}
    return sorted(report, key=lambda r: order[r.name])


def _log_layer(result: LayerResult, plan: LayerPlan, qlayer: QuantLayer, cfg: QuantConfig,
               after_activation: bool) -> None:
    assert plan.info is not None
    log.info(
        "%s (W%d%s%s): loss nearest %.4g -> adaround %.4g, %.1f%% rounded differently, "
        "%s%s, %.1fs",
        plan.name, plan.bits, act_note(qlayer),
        f", loss after {plan.info.activation_name}" if after_activation else "",
        result.loss_nearest, result.loss_adaround, 100 * result.flipped,
        _describe(result, cfg, plan),
        f", in one loop with {result.batched - 1} like it" if result.batched > 1 else "",
        result.seconds,
    )
