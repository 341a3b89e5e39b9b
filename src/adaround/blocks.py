"""Reconstruction units: the blocks of a network (BRECQ), and single layers outside them.

Blocks are found from one traced forward pass:

* residual blocks: a module whose own forward adds two tensors that both derive from its
  input (torchvision BasicBlock/Bottleneck, the CIFAR ResNets' blocks, inverted residuals with
  a skip, pre-norm transformer layers);
* transformer layers: an entry of a ModuleList/Sequential holding an attention module and at
  least two quantizable layers (BERT's layer adds its residuals in submodules);
* siblings: the other entries of the same ModuleList/Sequential with the same class as a found
  block (inverted-residual blocks without a skip, e.g. where the stride or width changes).

Blocks never nest (the outermost wins) and never include the whole model. `blocks=(...)` in
the config names them instead (module names or glob patterns, outermost match wins). Every
quantized layer outside a block is a unit of its own.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from adaround.errors import ModelError
from adaround.nn.quant_layer import QUANTIZABLE, QuantLayer

log = logging.getLogger(__name__)

_ADDS = {"add", "add_", "__add__", "__iadd__", "__radd__"}


@dataclass(frozen=True)
class Unit:
    """What one reconstruction optimises: a module and the quantized layers in it."""

    name: str  # module name in the model ("" never: the model itself is not a unit)
    layers: tuple[str, ...]  # quantized layers inside, in execution order
    kind: str  # "block" or "layer"


def _tensors(obj: Any) -> list[Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, Tensor)]


class _Frame:
    def __init__(self, name: str, inputs: list[Tensor]) -> None:
        self.name = name
        self.derived = {id(t) for t in inputs[:1]}  # ids of tensors computed from the input
        self.residual = False


class _ResidualFinder(TorchFunctionMode):
    """Marks modules whose own forward adds two tensors derived from the module's input."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[_Frame] = []
        self.keep: list[Tensor] = []  # keeps tensors alive so their ids stay unique
        self.residual: set[str] = set()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        self.keep.extend(ins + outs)
        ids = [id(t) for t in ins]
        for frame in self.frames:
            if any(i in frame.derived for i in ids):
                frame.derived.update(id(t) for t in outs)
        name = getattr(func, "__name__", "")
        if self.frames and name in _ADDS and len(ins) >= 2:
            top = self.frames[-1]
            if all(id(t) in top.derived for t in ins[:2]):
                self.residual.add(top.name)
        return out

    def pre_hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            self.frames.append(_Frame(name, _tensors(args)))
            self.calls[name] = self.calls.get(name, 0) + 1
        return hook

    def post_hook(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self.frames.pop()


def _trace_residuals(model: nn.Module, example: Tensor) -> tuple[set[str], dict[str, int]]:
    finder = _ResidualFinder()
    handles = []
    for name, module in model.named_modules():
        if name and not isinstance(module, (*QUANTIZABLE, QuantLayer)):
            handles.append(module.register_forward_pre_hook(finder.pre_hook(name)))
            handles.append(module.register_forward_hook(finder.post_hook))
    try:
        with torch.no_grad(), finder:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return finder.residual, finder.calls


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def _quantizable_names(model: nn.Module, prefix: str) -> list[str]:
    module = model.get_submodule(prefix)
    return [f"{prefix}.{n}" if n else prefix for n, m in module.named_modules()
            if isinstance(m, (*QUANTIZABLE, QuantLayer))]


def _list_entries(model: nn.Module) -> dict[str, list[str]]:
    """{container name: [entry names]} for every ModuleList / Sequential."""
    return {name: [f"{name}.{child}" if name else child for child, _ in m.named_children()]
            for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}


def _outermost(names: set[str]) -> list[str]:
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names if o != n))


def discover_blocks(model: nn.Module, example: Tensor) -> list[str]:
    """Names of the blocks of `model` found automatically (see the module docstring)."""
    residual, calls = _trace_residuals(model, example[:2])
    found = {n for n in residual if len(_quantizable_names(model, n)) >= 1}
    entries = _list_entries(model)
    for siblings in entries.values():
        for name in siblings:
            module = model.get_submodule(name)
            attention = any(_is_attention(m) for m in module.modules())
            if attention and len(_quantizable_names(model, name)) >= 2:
                found.add(name)
    for siblings in entries.values():
        kinds = {type(model.get_submodule(n)) for n in siblings if n in found}
        found.update(n for n in siblings if type(model.get_submodule(n)) in kinds
                     and _quantizable_names(model, n))
    once = {n for n in found if calls.get(n, 0) == 1}
    for name in sorted(found - once):
        log.info("%s runs %d times per forward: its layers are reconstructed one by one",
                 name, calls.get(name, 0))
    return _outermost(once)


def named_blocks(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Modules matching `patterns` (outermost matches), each with a quantizable layer."""
    names = {n for n, _ in model.named_modules() if n}
    matched = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    matched = {n for n in matched if _quantizable_names(model, n)}
    if not matched:
        raise ModelError(f"blocks={list(patterns)} match no module with a quantizable layer; "
                         f"module names look like: {', '.join(sorted(names)[:8])}")
    return _outermost(matched)


def plan_units(block_names: list[str], order: list[str], quantized: set[str]) -> list[Unit]:
    """Units in execution order: each block where its first layer runs, other layers alone.

    `order` is the execution order of the quantizable layers; `quantized` those to reconstruct.
    """
    owner: dict[str, str] = {}
    for block in block_names:
        for layer in order:
            if layer.startswith(block + "."):
                owner[layer] = block
    units: list[Unit] = []
    seen: set[str] = set()
    for layer in order:
        if layer not in quantized:
            continue
        block = owner.get(layer)
        if block is None:
            units.append(Unit(layer, (layer,), "layer"))
        elif block not in seen:
            seen.add(block)
            members = tuple(n for n in order if owner.get(n) == block and n in quantized)
            units.append(Unit(block, members, "block"))
    return units
