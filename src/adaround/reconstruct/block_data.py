"""Data of one reconstruction unit: its inputs in the quantized network, its FP output, and
(for BRECQ's Fisher weighting) the squared gradient of the task loss at that output.

Each is captured with hooks on the unit's module, the forward pass stopping as soon as the
hook has what it needs. Units may take several arguments (a transformer layer's mask, an
EfficientNet block's `drop_connect_rate` keyword): every argument is kept, and the tensors
whose first dimension is the batch are indexed per sample, the others passed as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from adaround.reconstruct.cache import not_called
from adaround.reconstruct.loop import fast_layout


class _Reached(Exception):
    """Raised by a hook to end the forward pass once the unit's data is captured."""


def first_tensor(out: Any) -> Tensor:
    """A module's output, or the first tensor of a tuple/dict output (transformer layers)."""
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError(f"the unit's output holds no tensor ({type(out).__name__})")
    return leaves[0]


@dataclass
class UnitInputs:
    """The (args, kwargs) of every call, with per-sample tensors concatenated over calls."""

    leaves: list[Any]  # a Tensor of all samples where `per_sample`, else the first call's value
    per_sample: list[bool]
    spec: Any
    count: int

    @classmethod
    def from_calls(cls, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> UnitInputs:
        flat = [tree_flatten(call) for call in calls]
        spec = flat[0][1]
        sizes = [first_tensor(call).shape[0] for call in calls]
        leaves, per_sample = [], []
        for i, first in enumerate(flat[0][0]):
            batched = isinstance(first, Tensor) and all(
                isinstance(f[0][i], Tensor) and f[0][i].dim() > 0 and f[0][i].shape[0] == n
                for f, n in zip(flat, sizes))
            per_sample.append(batched)
            leaves.append(fast_layout(torch.cat([f[0][i] for f in flat])) if batched else first)
        return cls(leaves, per_sample, spec, sum(sizes))

    def select(self, idx: Tensor | slice) -> tuple[tuple[Any, ...], dict[str, Any]]:
        leaves = [leaf[idx] if batched else leaf
                  for leaf, batched in zip(self.leaves, self.per_sample)]
        args, kwargs = tree_unflatten(leaves, self.spec)
        return args, kwargs


def capture_inputs(model: nn.Module, name: str, chunks: list[Tensor]) -> UnitInputs:
    """The inputs (args and kwargs) of module `name` for every calibration chunk."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        detach = [a.detach() if isinstance(a, Tensor) else a for a in args]
        calls.append((tuple(detach), {k: v.detach() if isinstance(v, Tensor) else v
                                      for k, v in kwargs.items()}))
        raise _Reached

    handle = model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for chunk in chunks:
                try:
                    model(chunk)
                except _Reached:
                    pass
    finally:
        handle.remove()
    if len(calls) != len(chunks):
        raise not_called(name, model.get_submodule(name))
    return UnitInputs.from_calls(calls)


def stack_outputs(outputs: list[Any], activation: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The unit's target from its output on every chunk: the first tensor of each (then
    `activation`, if given), concatenated over chunks."""
    tensors = [first_tensor(out).detach() for out in outputs]
    if activation is not None:
        tensors = [activation(t) for t in tensors]
    return fast_layout(torch.cat(tensors))


def capture_outputs(model: nn.Module, name: str, chunks: list[Tensor],
                    activation: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Module `name`'s output (then `activation`, if given) for every calibration chunk."""
    outputs: list[Tensor] = []

    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        outputs.append(first_tensor(out).detach())
        raise _Reached

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            for chunk in chunks:
                try:
                    model(chunk)
                except _Reached:
                    pass
    finally:
        handle.remove()
    if len(outputs) != len(chunks):
        raise not_called(name, model.get_submodule(name))
    return stack_outputs(outputs, activation)


def fisher_weights(model: nn.Module, name: str, chunks: list[Tensor],
                   mean: Callable[[Tensor], Tensor] = torch.mean) -> Tensor:
    """BRECQ's diagonal Fisher at module `name`'s output, damped: (1 + |g| / mean |g|)^2 per
    element and sample, g the gradient of the task loss there, normalised to mean 1 (so lambda
    keeps its meaning).

    The undamped g^2 puts nearly all the weight on the few samples the network is unsure of
    (measured on ResNet-20, BRECQ W2A4: 67.61 with it against 74.55 unweighted); BRECQ's
    released code damps it as (1 + |g|)^2, which at the scale of its g is almost plain MSE.
    Scaling g by its mean keeps the floor of 1 and makes the Fisher term count whatever the
    loss's scale. No labels: the loss is the cross-entropy against the FP network's own
    predictions (the argmax over the last dimension of its output).

    `mean`: the mean over all data (in a process group, where `chunks` are this process's
    shard: the all-reduced mean, adaround.distributed_units.shared_mean).
    """
    grads: list[Tensor] = []
    leaf: list[Tensor] = []

    def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
        t = first_tensor(out).detach().requires_grad_(True)
        leaf.append(t)
        t = t.clone()  # the network may modify its value in place (ReLU(inplace=True))
        if isinstance(out, Tensor):
            return t
        flat, spec = tree_flatten(out)
        index = next(i for i, v in enumerate(flat) if isinstance(v, Tensor))
        flat[index] = t
        return tree_unflatten(flat, spec)

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        for chunk in chunks:
            leaf.clear()
            with torch.enable_grad():
                logits = first_tensor(model(chunk))
                logits = logits.reshape(-1, logits.shape[-1])
                loss = F.cross_entropy(logits, logits.argmax(dim=-1), reduction="sum")
                (grad,) = torch.autograd.grad(loss, leaf[0])
            grads.append(grad.abs())
    finally:
        handle.remove()
    g = torch.cat(grads)
    weights = (1 + g / mean(g).clamp_min(torch.finfo(g.dtype).tiny)).pow(2)
    return fast_layout(weights / mean(weights))
