"""Transformer blocks: find them, record how the network calls them, run one of them alone.

A block is called by its network with the hidden states and other arguments (attention mask,
position embeddings, ...) that do not depend on the weights being rounded. One forward pass
records those arguments for every block and batch; afterwards a block runs on its own, on any
hidden states, without re-running the network before it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from adaround.errors import CalibrationDataError, ModelError
from adaround.nn.quant_layer import QuantLayer

log = logging.getLogger(__name__)


class Reached(Exception):
    """Raised by a hook to stop a forward pass once the input it wanted is captured."""


def _linear_count(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, QuantLayer)) for m in module.modules())


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: `path` if given, else the list of same-type
    modules holding Linear layers with the most parameters (encoder.layer, model.layers...)."""
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError as exc:
            raise ModelError(f"{type(model).__name__} has no module {path!r}: pass blocks= "
                             "the name of its ModuleList of transformer blocks") from exc
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not len(blocks):
            raise ModelError(f"{path} is a {type(blocks).__name__}, not a non-empty list of "
                             "blocks: pass the name of a ModuleList")
        return path, blocks  # type: ignore[return-value]
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if len({type(m) for m in module}) != 1 or not _linear_count(module[0]):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ModelError(
            f"{type(model).__name__} has no ModuleList of blocks with Linear layers: pass "
            "blocks='encoder.layer' (or the name of the list that holds its blocks)")
    return best[1], best[2]


@dataclass
class BlockCall:
    """How the network called a block for one batch, minus the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    positional: bool  # hidden states passed as the first positional argument

    def run(self, block: nn.Module, hidden: Tensor) -> Tensor:
        if self.positional:
            out = block(hidden, *self.args, **self.kwargs)
        else:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _split_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, BlockCall]:
    if args and isinstance(args[0], Tensor):
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs), True)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], BlockCall(tuple(args), rest, False)
    raise ModelError("a block was called without hidden states as its first argument or as "
                     "hidden_states=: pass blocks= the list of the network's transformer blocks")


@dataclass
class Recording:
    """Per batch: block 0's input, and every block's call."""

    inputs: list[Tensor] = field(default_factory=list)
    calls: list[list[BlockCall]] = field(default_factory=list)  # [block][batch]


def forward(model: nn.Module, batch: dict[str, Any]) -> None:
    """model(**batch) with no key/value cache; the model's own error names the bad input."""
    try:
        model(**batch)
    except Reached:
        raise
    except Exception as exc:
        shapes = {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, Tensor)}
        raise CalibrationDataError(
            f"the model rejected a calibration batch {shapes} ({type(exc).__name__}: {exc}); "
            "pass the keys its forward takes (input_ids, attention_mask, ...)") from exc


@contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """Blocks re-run many times must not append to a key/value cache."""
    config = getattr(model, "config", None)
    saved = getattr(config, "use_cache", None)
    if saved is not None:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if saved is not None:
            config.use_cache = saved  # type: ignore[union-attr]


@torch.no_grad()
def record_calls(model: nn.Module, blocks: nn.ModuleList, batches: list[dict[str, Any]],
                 only_first: bool = False) -> Recording:
    """Run the network on every batch, recording block 0's input and each block's arguments
    (`only_first`: block 0's input only, stopping there)."""
    rec = Recording(calls=[[] for _ in blocks])
    handles = []

    def hook_for(index: int):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden, call = _split_call(args, kwargs)
            if index == 0:
                rec.inputs.append(hidden.detach())
            rec.calls[index].append(call)
            if only_first:
                raise Reached
        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(hook_for(i), with_kwargs=True))
    try:
        for batch in batches:
            try:
                forward(model, batch)
            except Reached:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(rec.inputs) != len(batches):
        raise ModelError("the network did not call its first block once per batch: pass blocks= "
                         "the list of blocks its forward runs in order")
    return rec


@contextmanager
def float_mode(module: nn.Module) -> Iterator[None]:
    """Every QuantLayer inside `module` computes with its float weight for the duration."""
    layers = [m for m in module.modules() if isinstance(m, QuantLayer)]
    saved = [m.mode for m in layers]
    for m in layers:
        m.mode = "float"
    try:
        yield
    finally:
        for m, mode in zip(layers, saved):
            m.mode = mode


@contextmanager
def offloaded(blocks: nn.ModuleList, device: torch.device, active: bool) -> Iterator[None]:
    """While the network runs, each block moves to `device` for its own call and back to the
    CPU after it (`active`); otherwise nothing changes."""
    if not active:
        yield
        return
    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(lambda m, a: m.to(device) and None))
        handles.append(block.register_forward_hook(lambda m, a, o: m.to("cpu") and None))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for block in blocks:
            block.to("cpu")


@contextmanager
def capture_input(module: nn.Module, sink: list[Tensor]) -> Iterator[None]:
    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        sink.append(args[0].detach())
        raise Reached

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def token_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """A layer input [batch, positions, d] as the rows of real tokens [tokens, d]; inputs of
    another shape (e.g. a pooler's [batch, d]) keep every row."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])
