"""Which layers of a transformer are quantized, with what bits, and in which order."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from adaround.config import QuantConfig
from adaround.errors import ModelError
from adaround.hf.blocks import BlockCall, float_mode
from adaround.hf.options import HFOptions
from adaround.nn.quant_layer import QuantLayer
from adaround.prepare import _selected, set_submodule
from adaround.trace import trace_model

log = logging.getLogger(__name__)

Activation = Callable[[Tensor], Tensor] | None


class _BlockAlone(nn.Module):
    """One block as a function of its hidden states, for `trace_model`."""

    def __init__(self, block: nn.Module, call: BlockCall) -> None:
        super().__init__()
        self.block, self.call = block, call

    def forward(self, hidden: Tensor) -> Tensor:
        return self.call.run(self.block, hidden)


@dataclass
class HFPlan:
    blocks_name: str
    bits: dict[str, int] = field(default_factory=dict)  # every quantized layer
    nearest: list[str] = field(default_factory=list)  # embeddings: nearest rounding
    per_block: list[list[str]] = field(default_factory=list)
    head: list[str] = field(default_factory=list)

    def in_blocks(self) -> list[str]:
        return [n for names in self.per_block for n in names]

    def block_layers(self, index: int, block: nn.Module, call: BlockCall, hidden: Tensor
                     ) -> list[tuple[str, Activation]]:
        """The block's planned layers in execution order with the activation after each;
        layers the block calls more than once, or never, are rounded to nearest here."""
        prefix = f"{self.blocks_name}.{index}."
        planned = set(self.per_block[index])
        with float_mode(block):
            trace = trace_model(_BlockAlone(block, call), hidden.to(_device(block)))
        order: list[tuple[str, Activation]] = []
        for info in trace.layers:
            name = prefix + info.name.removeprefix("block.")
            if name not in planned:
                continue
            planned.discard(name)
            if info.calls != 1:
                log.warning("%s is called %d times per block call: rounded to nearest", name,
                            info.calls)
                _round_nearest(block, name, prefix)
                continue
            order.append((name, info.activation))
        for name in sorted(planned):
            log.warning("%s is never called by its block: rounded to nearest", name)
            _round_nearest(block, name, prefix)
        return order


def _device(module: nn.Module):  # type: ignore[no-untyped-def]
    return next(module.parameters()).device


def _round_nearest(block: nn.Module, name: str, prefix: str) -> None:
    qlayer = block.get_submodule(name.removeprefix(prefix))
    qlayer.set_codes(qlayer.nearest_codes())


def plan_hf(model: nn.Module, blocks_name: str, blocks: nn.ModuleList, cfg: QuantConfig,
            opts: HFOptions) -> HFPlan:
    """Swap QuantLayers (grids fitted) into `model` for the layers to quantize."""
    plan = HFPlan(blocks_name)
    block_prefixes = tuple(f"{blocks_name}.{i}." for i in range(len(blocks)))
    outside = [(n, m) for n, m in model.named_modules()
               if n and not n.startswith(block_prefixes) and n != blocks_name]
    if opts.embeddings:
        plan.nearest = [n for n, m in outside if isinstance(m, nn.Embedding) and _selected(n, cfg)]
    for prefix in block_prefixes:
        block = model.get_submodule(prefix[:-1])
        plan.per_block.append([prefix + n for n, m in block.named_modules()
                               if isinstance(m, nn.Linear) and _selected(prefix + n, cfg)])
    if opts.head:
        plan.head = [n for n, m in outside if isinstance(m, nn.Linear) and _selected(n, cfg)]
    order = [*plan.nearest, *plan.in_blocks(), *plan.head]
    if not plan.in_blocks() and not plan.head:
        raise ModelError(
            f"no nn.Linear to quantize in {blocks_name} (include={list(cfg.include)}, "
            f"exclude={list(cfg.exclude)}): the blocks of {type(model).__name__} may use "
            "another layer type (GPT-2's Conv1D is not an nn.Linear), or the patterns leave none")
    ends = {order[0], order[-1]}
    for name in order:
        bits = cfg.first_last_bits if cfg.first_last_bits and name in ends else cfg.weight_bits
        qlayer = QuantLayer(model.get_submodule(name), bits, cfg.symmetric, cfg.per_channel,
                            cfg.group_size)
        qlayer.fit_grid(cfg.scale_method)
        set_submodule(model, name, qlayer)
        plan.bits[name] = bits
    return plan
