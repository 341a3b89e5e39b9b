"""`quantize`: the whole pipeline of the paper, one layer after another in execution order."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from adaround import distributed, distributed_units, input_stats
from adaround.act_calibration import calibrate_activations, describe_convention
from adaround.act_config import uses_unit_loop
from adaround.calibration import (
    check_finite_weights,
    check_quantizable,
    collect_calibration,
    model_device,
)
from adaround.checkpoint import Checkpoint
from adaround.checks import check_config
from adaround.config import QuantConfig, short_run_note
from adaround.equivalence import (
    CHECK_SAMPLES,
    NOISE_FACTOR,
    TOLERANCE,
    Difference,
    first_difference,
    relative_error,
    run_outputs,
)
from adaround.errors import CalibrationDataError, ModelError
from adaround.guards import check_finite, check_input_scale, check_result, open_checkpoint
from adaround.inputs import IndexedInputs, Structured, collect_structured, strip_prefix
from adaround.nn.act_quant import act_note, act_quant_spec, quantize_layer_input
from adaround.nn.quant_layer import QuantLayer
from adaround.prepare import LayerPlan, fold_batchnorms, plan_layers, swap_in_quant_layers
from adaround.reconstruct import LayerResult, adaround_layer
from adaround.reconstruct.batched import round_stacked
from adaround.reconstruct.loop import eval_rows
from adaround.reconstruct.quadratic import (
    Moments,
    UnfoldError,
    accumulate_moments,
    conv_input,
    patches,
    step_costs,
    supports_quadratic,
)
from adaround.reconstruct.spill import budget_store
from adaround.reconstruct.stream import GraphEngine, RerunEngine, make_engine
from adaround.reconstruct.units import round_units
from adaround.trace import Trace, trace_model

log = logging.getLogger(__name__)

FORWARD_BATCH = 128
META_ATTR = "adaround_meta"
REPORT_ATTR = "adaround_report"


def _rejected(x: Tensor, exc: Exception) -> CalibrationDataError:
    """The model's own error on calibration inputs, re-raised with the input that caused it."""
    return CalibrationDataError(
        f"the model rejected calibration inputs of shape {tuple(x.shape)} "
        f"({type(exc).__name__}: {exc}); pass inputs shaped [samples, ...] and preprocessed "
        "as the model expects them (a list of single samples is concatenated: stack it with "
        "torch.stack; several inputs: batches of tuples or dicts)")


def _trace(model: nn.Module, x: Tensor) -> Trace:
    try:
        return trace_model(model, x[:2])
    except Exception as exc:
        raise _rejected(x[:2], exc) from exc


def prepare_float(model: nn.Module, x: Tensor, cfg: QuantConfig) -> tuple[nn.Module, Trace, dict]:
    """Eval-mode float32 copy of `model` with BatchNorm folded, and its trace.

    The folded copy is checked against the unfolded one on a calibration batch. A norm whose
    folding changes the outputs (a forward that does more than normalise, a norm whose buffers
    are not what its forward uses) is left in place, with a warning naming it; a difference
    that no norm explains raises ModelError naming the first module whose output differs.
    """
    xb = x[:CHECK_SAMPLES]
    reference: list[Tensor] | None = None
    noise: float | None = None  # the network's own, measured once where first needed
    keep: set[str] = set()
    while True:
        fp = float_copy(model)
        if reference is None:
            reference = _outputs(fp, xb)
        trace = _trace(fp, x)
        folded = fold_batchnorms(fp, trace, frozenset(keep)) if cfg.fold_bn else {}
        if not folded:
            return fp, trace, folded
        trace = _trace(fp, x)
        error = relative_error(reference, _outputs(fp, xb))
        if error > TOLERANCE and noise is None:
            noise = float_noise(model, reference, xb)
        if error <= TOLERANCE or error <= NOISE_FACTOR * (noise or 0.0):
            log.debug("prepared float network equals the model (relative error %.2g)", error)
            return fp, trace, folded
        diff = first_difference(float_copy(model), fp, xb, skip=set(folded))
        norm = _folded_norm(diff, folded)
        if norm is None or norm in keep:
            where = diff.describe() if diff is not None else "no single module"
            raise ModelError(
                f"folding BatchNorm changes this network's output (relative error {error:.3g}; "
                f"first difference at {where}): pass fold_bn=False (--no-fold-bn)"
            )
        log.warning("folding %s into %s changes the network's output (%s): left unfolded",
                    norm, next(k for k, v in folded.items() if v == norm), diff.describe())
        keep.add(norm)


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def float_noise(model: nn.Module, reference: list[Tensor], x: Tensor) -> float:
    """The network's own float32 noise: its output error when every parameter moves by about
    one float32 ulp (deep networks reach 1e-4 that way, e.g. Inception v3). Measured only when
    a rewrite misses TOLERANCE, so it costs nothing on the networks that pass."""
    noisy = float_copy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
                p.mul_(1 + noise * 2.0**-23)
    return relative_error(reference, _outputs(noisy, x))


def _folded_norm(diff: Difference | None, folded: dict[str, str]) -> str | None:
    """The folded norm the difference is found at (the norm itself, or inside it)."""
    if diff is None:
        return None
    for norm in folded.values():
        if diff.name == norm or diff.name.startswith(norm + "."):
            return norm
    return None


def float_copy(model: nn.Module) -> nn.Module:
    """Eval-mode copy of `model` in float32 (reconstruction always runs in float32)."""
    fp = copy.deepcopy(model).eval()
    if any(p.is_floating_point() and p.dtype != torch.float32
           for p in [*fp.parameters(), *fp.buffers()]):
        fp = fp.float()
    return fp


def _outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    try:
        return run_outputs(model, x)
    except Exception as exc:
        raise _rejected(x, exc) from exc


def check_wrapped(fp: nn.Module, qmodel: nn.Module, x: Tensor) -> None:
    """The network with quantized twins swapped in (still computing in float) must equal the
    prepared float network; where not, name the first module that differs."""
    xb = x[:CHECK_SAMPLES]
    error = relative_error(_outputs(fp, xb), _outputs(qmodel, xb))
    if error <= TOLERANCE:
        return
    diff = first_difference(fp, qmodel, xb)
    where = diff.describe() if diff is not None else "no single module"
    raise ModelError(
        f"wrapping this network's layers for quantization changes its output (relative error "
        f"{error:.3g}; first difference at {where}): its forward code depends on the layer "
        "objects themselves; exclude that module (exclude=(...)) or report the model"
    )


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
    (adaround.checkpoint). Other model, data or options in the folder are refused. In a
    process group (torchrun) process 0 writes it and every process resumes from it: pass a
    folder on storage all processes share; the number of processes may differ between runs.

    Example:
        >>> cfg = QuantConfig(weight_bits=4, iters=10)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
        >>> qnet = quantize(net, torch.randn(64, 3, 6, 6), cfg)
    """
    cfg = check_config(config)
    check_quantizable(model)
    if (note := short_run_note(cfg)) is not None:
        log.warning("%s", note)
    structured = collect_structured(calib, model)
    if structured is not None:  # several inputs: tuples or dicts of tensors per batch
        return _quantize_structured(model, structured, cfg, progress, checkpoint_dir)
    check_finite_weights(model)
    device = model_device(model)
    x = collect_calibration(calib).to(device)
    dtype = _float_dtype(model)
    if x.is_floating_point():
        x = x.float()  # reconstruction runs in float32 whatever the model's dtype
    if cfg.rounding == "adaround" and x.shape[0] < cfg.batch_size:
        raise CalibrationDataError(
            f"calibration data has {x.shape[0]} samples, fewer than batch_size={cfg.batch_size}: "
            "pass more samples (hundreds) or lower batch_size"
        )
    check_input_scale(x)
    checkpoint = open_checkpoint(checkpoint_dir, model, x, cfg, distributed.rank(),
                                 distributed.world())
    distributed.check_same_progress(checkpoint, x.device)
    fp, trace, folded = prepare_float(model, x, cfg)
    plans = plan_layers(fp, trace, cfg)
    qmodel = swap_in_quant_layers(copy.deepcopy(fp), plans, cfg, fit=not distributed.active())
    if distributed.active():  # each process fits 1/N of the grids
        distributed.fit_grids(qmodel, [p.name for p in plans], cfg.scale_method)
    check_wrapped(fp, qmodel, x)
    if cfg.act_bits is not None:
        calibrate_activations(qmodel, [p.name for p in plans], trace.names(), x, cfg)
        log.info("%s", describe_convention(cfg, trace.names()))
    if cfg.rounding == "adaround" and uses_unit_loop(cfg):  # blocks, QDrop, learned steps
        if distributed.active():  # in a process group: data sharded, gradients summed
            report = distributed_units.round_units(fp, qmodel, trace, plans, x, cfg, progress,
                                                   checkpoint)
        else:
            report = round_units(fp, qmodel, trace, plans, x, cfg, progress, checkpoint)
    else:
        report = _round_layers(fp, qmodel, plans, x, cfg, progress, checkpoint)
    qmodel.eval()
    if dtype is not None and dtype != torch.float32:
        qmodel = qmodel.to(dtype)  # codes stay integers; scales and biases take the dtype
    setattr(qmodel, META_ATTR, {
        "config": cfg.to_dict(),
        "folded": folded,
        "layers": {p.name: p.bits for p in plans},
        "act_quant": act_quant_spec(qmodel),  # {layer: {bits, signed}}; scales in the state
        input_stats.KEY: input_stats.describe(x),  # for evaluate's warnings
    })
    setattr(qmodel, REPORT_ATTR, report)
    return qmodel


def _quantize_structured(model: nn.Module, inputs: Structured, cfg: QuantConfig,
                         progress: bool, checkpoint_dir: Any) -> nn.Module:
    """Quantize a model with several inputs through an index-driven wrapper, then unwrap."""
    device = model_device(model)
    inputs = Structured([t.to(device) for t in inputs.args],
                        {k: t.to(device) for k, t in inputs.kwargs.items()})
    for t in [*inputs.args, *inputs.kwargs.values()]:
        check_input_scale(t)  # the index tensor below says nothing of the inputs
    wrapped = quantize(IndexedInputs(model, inputs), torch.arange(inputs.count()), cfg,
                       progress=progress, checkpoint_dir=checkpoint_dir)
    qmodel = wrapped.model
    meta = getattr(wrapped, META_ATTR)
    meta.pop(input_stats.KEY, None)  # statistics of sample indices, not of the inputs
    meta["folded"] = {strip_prefix(k): strip_prefix(v) for k, v in meta["folded"].items()}
    for key in ("layers", "act_quant"):
        meta[key] = {strip_prefix(k): v for k, v in meta[key].items()}
    setattr(qmodel, META_ATTR, meta)
    report = [dataclasses.replace(r, name=strip_prefix(r.name))
              for r in getattr(wrapped, REPORT_ATTR)]
    setattr(qmodel, REPORT_ATTR, report)
    return qmodel


def _round_to_nearest(qmodel: nn.Module, plans: list[LayerPlan]) -> None:
    for plan in plans:
        qlayer = qmodel.get_submodule(plan.name)
        qlayer.set_codes(qlayer.nearest_codes())


def _layer_moments(engine: GraphEngine | RerunEngine, name: str, qlayer: QuantLayer,
                   cfg: QuantConfig, accumulate: Callable[..., Moments] = accumulate_moments,
                   samples: int | None = None) -> Moments | None:
    """The moments of the layer's inputs where cfg.loss asks for them and the layer allows
    (for "auto": where a quadratic step costs less than a sampled one), checked finite;
    `accumulate` sums them (over this process's shard and all-reduced, in
    adaround.distributed, where `samples` is the count of all processes' samples; the
    engine's here)."""
    if cfg.loss == "sampled":
        return None
    if not supports_quadratic(qlayer.layer):
        log.info("%s: the quadratic loss does not unfold %s; using the sampled loss", name,
                 type(qlayer.layer).__name__)
        return None
    try:
        # the first chunk decides "auto" and is then summed with the rest (not fetched twice:
        # the rerun engine runs the network for each chunk it hands out)
        stream = iter(engine.input_chunks(name))
        head = next(stream)
        first = quantize_layer_input(qlayer, head[0][:1])
        if cfg.loss == "auto":
            quadratic_cost, sampled_cost = step_costs(qlayer.layer, first, cfg.batch_size)
            if quadratic_cost >= sampled_cost:
                return None
        chunks = ((quantize_layer_input(qlayer, xq), xf)
                  for xq, xf in itertools.chain([head], stream))
        share = _moment_share(qlayer, first, cfg, engine.samples if samples is None else samples)
        moments = accumulate(qlayer.layer, chunks, *share)
    except UnfoldError as exc:
        log.info("%s: %s; using the sampled loss", name, exc)
        return None
    # NaN/Inf in either stream's inputs reaches the sums: one check of each instead of a
    # pass over the cached inputs (which the quadratic loss no longer gathers)
    for what, value in (("inputs", moments.a), ("inputs or FP inputs", moments.r.sum() +
                                                moments.c)):
        check_finite(name, what, value.reshape(-1))
    return moments


def _moment_share(qlayer: QuantLayer, first: Tensor, cfg: QuantConfig,
                  samples: int) -> tuple[float, int]:
    """(share of the positions, seed) for the moments: cfg.moment_positions of all of them
    (`first`: one sample of the layer's input)."""
    if cfg.moment_positions is None:
        return 1.0, cfg.seed
    positions = patches(qlayer.layer, conv_input(qlayer.layer, first)).shape[1] * samples
    return min(1.0, cfg.moment_positions / positions), cfg.seed


def gathers_no_data(moments: Moments | None, cfg: QuantConfig) -> bool:
    """Whether a layer is rounded on the quadratic loss alone: its per-layer losses then need
    the samples of `eval_rows` only, not every cached input and target."""
    return moments is not None and cfg.loss in ("auto", "quadratic")


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
    if distributed.active():  # in a process group: data and rows split across processes
        return distributed.round_layers(fp, qmodel, plans, x, cfg, progress, checkpoint)
    names = [p.name for p in plans if p.reconstructable]
    with budget_store(cfg.memory_budget_mb) as store:
        # inputs="float": both streams are the FP network, and the layers are independent
        source = fp if cfg.inputs == "float" else qmodel
        engine = make_engine(fp, source, list(x.split(FORWARD_BATCH)), names, store)
        return _reconstruct_each(engine, qmodel, plans, cfg, progress, checkpoint)


class LayerWork:
    """How `_reconstruct_each` gets a layer's moments and rounds it: in this process (this
    class), or split across a process group (`adaround.distributed.SharedWork`)."""

    speaks = True  # logs the per-layer lines (process 0 of a group only)

    def __init__(self, samples: int) -> None:
        self.samples = samples  # calibration samples the engine holds

    def moments(self, engine: GraphEngine | RerunEngine, name: str, qlayer: QuantLayer,
                cfg: QuantConfig) -> Moments | None:
        return _layer_moments(engine, name, qlayer, cfg)

    def eval_at(self) -> Tensor:
        """The engine's samples that the per-layer losses of a quadratic-only layer need."""
        return eval_rows(self.samples, 0, self.samples)

    def round(self, name: str, qlayer: QuantLayer, xq: Tensor, target: Tensor,
              activation: Any, cfg: QuantConfig, generator: torch.Generator, progress: bool,
              start: float, moments: Moments | None, rows_only: bool) -> LayerResult:
        """Round one layer on (xq, target): all the engine's samples, or `eval_at`'s only
        (`rows_only`)."""
        return adaround_layer(name, qlayer, xq, target, activation, cfg, generator, progress,
                              start, moments)

    def round_independent(self, named: list[tuple[str, QuantLayer, Moments]],
                          cfg: QuantConfig, progress: bool) -> list[LayerResult]:
        """inputs="float": the layers collected on the quadratic loss, rounded together."""
        return round_stacked(named, cfg, progress)


def _reconstruct_each(engine: GraphEngine | RerunEngine, qmodel: nn.Module,
                      plans: list[LayerPlan], cfg: QuantConfig,
                      progress: bool, checkpoint: Checkpoint,
                      work: LayerWork | None = None) -> list[LayerResult]:
    """AdaRound every planned layer in execution order (nearest where it cannot)."""
    work = work or LayerWork(engine.samples)
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
        moments = work.moments(engine, plan.name, qlayer, cfg)
        rows_only = gathers_no_data(moments, cfg)
        if rows_only:
            if cfg.inputs == "float":
                stacked.append((plan.name, qlayer, moments))  # rounded below, with its likes
                continue
            xq, target = engine.layer_rows(plan.name, activation, work.eval_at())
        else:
            xq, target = engine.layer_data(plan.name, activation)
        xq = quantize_layer_input(qlayer, xq)  # x^ includes the layer's activation grid
        check_finite(plan.name, "inputs", xq)
        check_finite(plan.name, "FP outputs (targets)", target)
        result = work.round(plan.name, qlayer, xq, target, activation, cfg, generator,
                            progress, start, moments, rows_only)
        del xq, target, moments
        check_result(result.name, result.loss_nearest, result.loss_adaround)
        report.append(result)
        checkpoint.record([plan.name], qmodel, generator, report)
        if work.speaks:
            _log_layer(result, plan, qlayer, cfg, activation is not None)
    by_name = {p.name: p for p in plans}
    stacked_results = work.round_independent(stacked, cfg, progress)
    for result in stacked_results:
        check_result(result.name, result.loss_nearest, result.loss_adaround)
        report.append(result)
        if work.speaks:
            _log_layer(result, by_name[result.name], qmodel.get_submodule(result.name), cfg,
                       False)
    if stacked_results:
        checkpoint.record([r.name for r in stacked_results], qmodel, generator, report)
    order = {p.name: i for i, p in enumerate(plans)}
    return sorted(report, key=lambda r: order[r.name])


def _log_layer(result: LayerResult, plan: LayerPlan, qlayer: QuantLayer, cfg: QuantConfig,
               after_activation: bool) -> None:
    """One line per layer: nearest and AdaRound on the same loss (and on the optimised one,
    where that is another: the quadratic loss is taken before the activation)."""
    assert plan.info is not None
    where = result.measured
    if after_activation and plan.info.activation_name:
        where = f"after {plan.info.activation_name}"
    optimised = ""
    if result.objective_nearest is not None and result.objective_adaround is not None:
        optimised = (f"; optimised loss (quadratic, layer output) nearest "
                     f"{result.objective_nearest:.4g} -> adaround {result.objective_adaround:.4g}")
    log.info(
        "%s (W%d%s): loss %s nearest %.4g -> adaround %.4g%s, %.1f%% rounded differently, "
        "%s%s, %.1fs",
        plan.name, plan.bits, act_note(qlayer), where,
        result.loss_nearest, result.loss_adaround, optimised, 100 * result.flipped,
        _describe(result, cfg, plan),
        f", in one loop with {result.batched - 1} like it" if result.batched > 1 else "",
        result.seconds,
    )
