"""`quantize_hf`: AdaRound on a transformer, one block after another.

For block i the FP and the quantized stream each hold the block's input hidden states for
every calibration batch. Each Linear of the block, in execution order, gets its input from a
run of that block alone, stopped at the layer (float weights for the FP stream; the layers
already rounded, quantized, for the other), restricted to real tokens; AdaRound then rounds
it. Once every Linear of the block is rounded, both streams advance through the block. So the
network before the block is never re-run, and only one block's inputs are held at a time.
"""

from __future__ import annotations

import copy
import logging
import os
import resource
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from adaround import distributed
from adaround.api import META_ATTR, REPORT_ATTR
from adaround.calibration import check_finite_weights, model_device
from adaround.checkpoint import Checkpoint
from adaround.config import QuantConfig, short_run_note
from adaround.equivalence import CHECK_SAMPLES, TOLERANCE, flatten_tensors, relative_error
from adaround.errors import ConfigError, ModelError
from adaround.guards import open_checkpoint
from adaround.hf.blocks import (
    BlockCall,
    Reached,
    capture_input,
    find_blocks,
    float_mode,
    forward,
    no_cache,
    offloaded,
    record_calls,
    token_rows,
)
from adaround.hf.data import calibration_batches, to_device, token_mask
from adaround.hf.options import HF_ATTR, HFOptions, HFStats
from adaround.hf.plan import HFPlan, plan_hf
from adaround.hf.store import BatchStore, Budget
from adaround.nn.quant_layer import QuantLayer
from adaround.reconstruct import LayerResult, adaround_layer
from adaround.reconstruct.cache import layer_target
from adaround.reconstruct.quadratic import accumulate_moments

log = logging.getLogger(__name__)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _check_wrapped(model: nn.Module, qmodel: nn.Module, batch: dict[str, Any],
                   device: torch.device) -> None:
    """The model with its Linear layers wrapped (still float) must equal the user's model on
    a few calibration samples; where not, refuse with the error measured."""
    small = {k: v[:CHECK_SAMPLES] if isinstance(v, Tensor) else v for k, v in batch.items()}
    reference = copy.deepcopy(model).eval().to(device)
    with torch.no_grad(), no_cache(reference), no_cache(qmodel):
        forward(reference, small)  # names a batch the model rejects
        error = relative_error(flatten_tensors(reference(**small)),
                               flatten_tensors(qmodel(**small)))
    if error <= TOLERANCE:
        return
    raise ModelError(
        f"wrapping this transformer's Linear layers for quantization changes its output "
        f"(relative error {error:.3g}): its forward code depends on the layer objects "
        "themselves; exclude those blocks (HFOptions(blocks=...)) or report the model")


def quantize_hf(model: nn.Module, calib: Any, config: QuantConfig | None = None,
                options: HFOptions | None = None, *, tokenizer: Any = None,
                progress: bool = False,
                checkpoint_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """Quantize the Linear layers of a transformer's blocks (and optionally its embeddings and
    head) with AdaRound, block by block; returns a new model, `model` is left unchanged.

    `calib`: a list of sentences (with `tokenizer`), a dict of tensors (input_ids,
    attention_mask, ...) or an iterable of such dicts. Padding positions (attention_mask 0)
    are left out of every layer's loss. Without `config`, 4-bit per-channel weights and the
    quadratic loss.

    `checkpoint_dir`: after each block (and head layer) the progress goes there; a run
    killed and started again with the same arguments continues after the last block done,
    with the same result (as `adaround.quantize`'s; in a process group, process 0 writes it
    and every process resumes from it).

    Example:
        >>> qmodel = quantize_hf(model, sentences, QuantConfig(group_size=64),  # doctest: +SKIP
        ...                      tokenizer=tokenizer)
    """
    cfg = config or QuantConfig(per_channel=True, loss="quadratic")
    if (note := short_run_note(cfg)) is not None:
        log.warning("%s", note)
    _refuse_unsupported(cfg)
    opts = options or HFOptions()
    start = time.perf_counter()
    check_finite_weights(model)
    home = model_device(model)
    device = torch.device(opts.device) if opts.device else home
    if opts.offload and device.type == "cpu":
        log.info("offload=True keeps the blocks not in use on the CPU; running on the CPU, "
                 "that changes nothing")
    batches = calibration_batches(calib, tokenizer, opts.max_length, opts.forward_batch)
    checkpoint = open_checkpoint(checkpoint_dir, model, batch_tensors(batches), cfg,
                                 distributed.rank(), distributed.world(), result_options(opts))
    distributed.check_same_progress(checkpoint, device)
    if distributed.active():  # in a process group: each process holds a run of batches
        batches = distributed.shard_items(batches)
        progress = progress and distributed.rank() == 0
    batches = [to_device(b, device) for b in batches]
    masks = [token_mask(b) for b in batches]
    qmodel = copy.deepcopy(model).eval()
    blocks_name, blocks = find_blocks(qmodel, opts.blocks)
    if opts.offload:
        qmodel.to(device)
        blocks.to("cpu")
    else:
        qmodel.to(device)
    plan = plan_hf(qmodel, blocks_name, blocks, cfg, opts)
    if not opts.offload:
        _check_wrapped(model, qmodel, batches[0], device)
    limit = opts.memory_budget_mb
    if limit is None:  # QuantConfig's budget (the same option for `adaround.quantize`)
        limit = getattr(cfg, "memory_budget_mb", None)
    budget = Budget(limit, opts.spill_dir)
    try:
        with torch.no_grad(), no_cache(qmodel):
            report = _run(qmodel, blocks, plan, batches, masks, cfg, opts, budget, device,
                          progress, checkpoint)
    finally:
        budget.close()
    if opts.offload or home != device:
        qmodel.to("cpu" if opts.offload else home)
    setattr(qmodel, META_ATTR, {"config": cfg.to_dict(), "folded": {},
                                "layers": dict(plan.bits), "hf": {"blocks": blocks_name}})
    setattr(qmodel, REPORT_ATTR, report)
    stats = HFStats(
        seconds=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb(),
        peak_device_mb=(torch.cuda.max_memory_allocated(device) / 2**20
                        if device.type == "cuda" else None),
        peak_cached_mb=budget.peak_in_memory / 2**20, spilled_mb=budget.spilled / 2**20,
        tokens=int(sum(m.sum() if m is not None else 0 for m in masks)),
        losses=sorted({r.objective for r in report}))
    setattr(qmodel, HF_ATTR, stats)
    log.info("%d layers in %d blocks, %.1fs, peak RSS %.0f MB, cached activations peak %.0f MB"
             " (%.0f MB spilled to disk)", len(plan.bits), len(blocks), stats.seconds,
             stats.peak_rss_mb, stats.peak_cached_mb, stats.spilled_mb)
    return qmodel


def _refuse_unsupported(cfg: QuantConfig) -> None:
    if getattr(cfg, "act_bits", None) is not None:
        raise ConfigError(f"quantize_hf rounds weights only, act_bits={cfg.act_bits} asks for "
                          "quantized activations: drop act_bits (or use adaround.quantize)")
    if getattr(cfg, "unit", None) not in (None, "layer"):
        raise ConfigError(f"quantize_hf reconstructs each Linear within its block, not "
                          f"unit={cfg.unit!r}: drop unit / method")


def batch_tensors(batches: list[dict[str, Any]]) -> dict[str, Tensor]:
    """The calibration batches' tensors by name ("<batch>.<key>"), for the checkpoint's
    fingerprint of the data (all batches, before a process group shards them)."""
    return {f"{i}.{key}": value for i, batch in enumerate(batches)
            for key, value in batch.items() if isinstance(value, Tensor)}


_SPEED_ONLY = ("offload", "device", "memory_budget_mb", "spill_dir")


def result_options(opts: HFOptions) -> dict[str, Any]:
    """The options that change what a run computes (not where or how fast it runs)."""
    return {k: v for k, v in asdict(opts).items() if k not in _SPEED_ONLY}


def _run(qmodel: nn.Module, blocks: nn.ModuleList, plan: HFPlan, batches: list[dict],
         masks: list[Tensor | None], cfg: QuantConfig, opts: HFOptions, budget: Budget,
         device: torch.device, progress: bool, checkpoint: Checkpoint) -> list[LayerResult]:
    for name in plan.nearest:
        qlayer = qmodel.get_submodule(name)
        qlayer.set_codes(qlayer.nearest_codes())
    if cfg.rounding == "nearest":
        for name in [*plan.in_blocks(), *plan.head]:
            qlayer = qmodel.get_submodule(name)
            qlayer.set_codes(qlayer.nearest_codes())
        return []
    store_device = torch.device("cpu") if opts.offload else None
    with float_mode(qmodel), offloaded(blocks, device, opts.offload):
        rec = record_calls(qmodel, blocks, batches)
    fp_in = BatchStore(budget, store_device)
    for x in rec.inputs:
        fp_in.append(x)
    q_in = fp_in
    if plan.nearest:  # rounded embeddings change the quantized stream's input of block 0
        with offloaded(blocks, device, opts.offload):
            q_rec = record_calls(qmodel, blocks, batches, only_first=True)
        q_in = BatchStore(budget, store_device)
        for x in q_rec.inputs:
            q_in.append(x)
    del rec.inputs
    generator = torch.Generator().manual_seed(cfg.seed)
    report: list[LayerResult] = checkpoint.restore(qmodel, generator)
    for i in tqdm(range(len(blocks)), desc="blocks", unit="block", disable=not progress):
        block = blocks[i].to(device)
        calls = rec.calls[i]
        unit = f"{plan.blocks_name}.{i}"
        if unit not in checkpoint.done:  # else its codes are restored: only advance through it
            for name, activation in plan.block_layers(i, block, calls[0], fp_in[0]):
                qlayer = qmodel.get_submodule(name)
                begin = time.perf_counter()
                with float_mode(block):
                    x_fp = _layer_rows(block, qlayer, calls, fp_in, masks, device)
                x_q = _layer_rows(block, qlayer, calls, q_in, masks, device)
                report.append(_round(name, qlayer, x_q, x_fp, activation, cfg, generator,
                                     progress, begin))
            checkpoint.record([unit], qmodel, generator, report)
        fp_out, q_out = BatchStore(budget, store_device), BatchStore(budget, store_device)
        for j, call in enumerate(calls):
            with float_mode(block):
                fp_out.append(call.run(block, fp_in[j].to(device)))
            q_out.append(call.run(block, q_in[j].to(device)))
        if q_in is not fp_in:
            q_in.clear()
        fp_in.clear()
        fp_in, q_in = fp_out, q_out
        if opts.offload:
            block.to("cpu")
    fp_in.clear()
    q_in.clear()
    for name in plan.head:
        if name in checkpoint.done:
            continue
        report.append(_round_head(qmodel, blocks, name, batches, masks, cfg, opts, device,
                                  generator, progress))
        checkpoint.record([name], qmodel, generator, report)
    return report


def _layer_rows(block: nn.Module, qlayer: QuantLayer, calls: list[BlockCall],
                inputs: BatchStore, masks: list[Tensor | None], device: torch.device
                ) -> list[Tensor]:
    """The layer's input at the real tokens of every batch, from runs of the block alone."""
    rows = []
    for j, call in enumerate(calls):
        sink: list[Tensor] = []
        with capture_input(qlayer, sink):
            try:
                call.run(block, inputs[j].to(device))
            except Reached:
                pass
        if not sink:
            raise RuntimeError(f"the block never called {type(qlayer.layer).__name__}")
        rows.append(token_rows(sink[0], masks[j]))
    return rows


def _round(name: str, qlayer: QuantLayer, x_q: list[Tensor], x_fp: list[Tensor],
           activation: Any, cfg: QuantConfig, generator: torch.Generator, progress: bool,
           begin: float) -> LayerResult:
    if distributed.active():  # data rows on each process, the layer's rows split
        result = distributed.round_hf_layer(name, qlayer, x_q, x_fp, activation, cfg,
                                            generator, progress, begin)
        if distributed.rank() == 0:
            log.info("%s (W%d): loss nearest %.4g -> adaround %.4g, %d/%d steps on the %s loss",
                     name, qlayer.bits, result.loss_nearest, result.loss_adaround,
                     result.iters, cfg.iters, result.objective)
        return result
    moments = None
    if cfg.loss != "sampled":  # "auto" too: a sampled batch of token rows sees little data
        moments = accumulate_moments(qlayer.layer, zip(x_q, x_fp))
    xq = torch.cat(x_q)
    target = layer_target(qlayer.layer, torch.cat(x_fp), activation)
    del x_fp
    result = adaround_layer(name, qlayer, xq, target, activation, cfg, generator, progress,
                            begin, moments)
    log.info("%s (W%d): loss nearest %.4g -> adaround %.4g, %.1f%% rounded differently, "
             "%d/%d steps on the %s loss over %d tokens, %.1fs", name, qlayer.bits,
             result.loss_nearest, result.loss_adaround, 100 * result.flipped, result.iters,
             cfg.iters, result.objective, xq.shape[0], result.seconds)
    return result


def _round_head(qmodel: nn.Module, blocks: nn.ModuleList, name: str, batches: list[dict],
                masks: list[Tensor | None], cfg: QuantConfig, opts: HFOptions,
                device: torch.device, generator: torch.Generator, progress: bool
                ) -> LayerResult:
    """A Linear outside the blocks (pooler, LM head): inputs from whole-network passes."""
    qlayer = qmodel.get_submodule(name)
    begin = time.perf_counter()
    streams: list[list[Tensor]] = []
    for fp in (True, False):
        rows = []
        for batch, mask in zip(batches, masks):
            sink: list[Tensor] = []
            with offloaded(blocks, device, opts.offload), capture_input(qlayer, sink):
                try:
                    if fp:
                        with float_mode(qmodel):
                            forward(qmodel, batch)
                    else:
                        forward(qmodel, batch)
                except Reached:
                    pass
            rows.append(token_rows(sink[0], mask))
        streams.append(rows)
    x_fp, x_q = streams
    activation = None
    return _round(name, qlayer, x_q, x_fp, activation, cfg, generator, progress, begin)
