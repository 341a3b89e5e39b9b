"""Find the quantizable layers of arbitrary forward code, in execution order.

One eager forward pass runs under a TorchFunctionMode that records every torch call (module
ops, `torch.nn.functional` calls, tensor methods, residual additions) with the identities of
its tensor inputs and outputs, while module hooks record which module produced which tensor.
From that we know, for each layer, what consumes its output: a BatchNorm that can be folded
into it, or an activation function that the reconstruction loss should include.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from adaround.nn.quant_layer import QUANTIZABLE, QuantLayer

ACTIVATIONS = frozenset({
    "relu", "relu6", "hardtanh", "leaky_relu", "elu", "selu", "celu", "gelu", "silu",
    "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish", "softplus", "clamp", "clip",
})
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class _Call:
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: set[int]
    outputs: set[int]
    modules: tuple[str, ...]


@dataclass
class LayerInfo:
    """One quantizable layer as the forward pass used it."""

    name: str
    calls: int = 0
    output_id: int | None = None
    activation: Callable[[Tensor], Tensor] | None = None
    activation_name: str | None = None
    batchnorm: str | None = None


@dataclass
class Trace:
    layers: list[LayerInfo] = field(default_factory=list)

    def names(self) -> list[str]:
        return [info.name for info in self.layers]


class _Recorder(TorchFunctionMode):
    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.calls: list[_Call] = []
        self.keep: list[Tensor] = []  # holds tensors alive so their ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if outs:
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
            self.keep.extend(ins + outs)
            self.calls.append(_Call(func, args, kwargs, {id(t) for t in ins},
                                    {id(t) for t in outs}, tuple(self.stack)))
        return out


def _replay(
    fn: Callable[..., Tensor], rest: list[Any], kwargs: dict[str, Any], t: Tensor
) -> Tensor:
    return fn(t, *rest, **kwargs)


def _activation(call: _Call, tensor_id: int) -> tuple[Callable[[Tensor], Tensor], str] | None:
    """The call as a function of its first argument, if it is an elementwise activation."""
    name = getattr(call.func, "__name__", "")
    base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    if base not in ACTIVATIONS or not call.args or id(call.args[0]) != tensor_id:
        return None
    fn = getattr(F, base, None) or getattr(torch, base)
    rest = list(call.args[1:])
    kwargs = {k: v for k, v in call.kwargs.items() if k != "inplace"}
    try:
        bound = inspect.signature(fn).bind(None, *rest, **kwargs)
        if "inplace" in bound.arguments:
            bound.arguments["inplace"] = False
        rest, kwargs = list(bound.args[1:]), dict(bound.kwargs)
    except (TypeError, ValueError):
        pass
    return functools.partial(_replay, fn, rest, kwargs), base


def _is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, (*QUANTIZABLE, QuantLayer))


def trace_model(model: nn.Module, example: Tensor) -> Trace:
    """Run `model` once on `example` and describe its quantizable layers in execution order."""
    stack: list[str] = []
    infos: dict[str, LayerInfo] = {}
    order: list[str] = []
    bn_inputs: dict[str, int] = {}
    handles = []
    names = {id(m): n for n, m in model.named_modules()}
    quantizable = {n for n, m in model.named_modules() if _is_quantizable(m)}

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = names[id(module)]
        stack.append(name)
        if _is_norm(module) and args and isinstance(args[0], Tensor):
            bn_inputs.setdefault(name, id(args[0]))

    def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        name = stack.pop()
        if name in quantizable and not any(outer in quantizable for outer in stack):
            info = infos.setdefault(name, LayerInfo(name))
            if info.calls == 0:
                order.append(name)
                info.output_id = id(output) if isinstance(output, Tensor) else None
            info.calls += 1

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    recorder = _Recorder(stack)
    try:
        with torch.no_grad(), recorder:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    trace = Trace([infos[n] for n in order])
    frozen = {n for n, m in model.named_modules() if is_frozen_norm(m)}
    neutral = {n for n, m in model.named_modules() if getattr(m, "adaround_neutral", False)}
    for info in trace.layers:
        _classify_consumer(info, recorder.calls, bn_inputs, frozen, neutral)
    return trace


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _BATCHNORMS) or is_frozen_norm(module)


def is_frozen_norm(module: nn.Module) -> bool:
    """A BatchNorm kept as buffers (torchvision's FrozenBatchNorm2d and its likes): per-channel
    weight, bias, running mean and variance, and an eps, but not a torch BatchNorm."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    return (all(k in buffers for k in ("weight", "bias", "running_mean", "running_var"))
            and isinstance(getattr(module, "eps", None), float))


def _sole_user(calls: list[_Call], tensor_id: int, name: str) -> _Call | None:
    users = []
    for call in calls:
        if tensor_id in call.inputs and name not in call.modules:
            users.append(call)
            if tensor_id in call.outputs:  # in-place: later uses see the new value
                break
    return users[0] if len(users) == 1 else None


def _classify_consumer(info: LayerInfo, calls: list[_Call], bn_inputs: dict[str, int],
                       frozen: set[str], neutral: set[str]) -> None:
    """The norm to fold into the layer, or the activation its loss should include. Calls
    inside a norm already folded (made the identity, kept for what else its forward does)
    are followed through."""
    if info.output_id is None or info.calls != 1:
        return
    tensor_id = info.output_id
    for _ in range(8):
        user = _sole_user(calls, tensor_id, info.name)
        if user is None:
            return
        owner = user.modules[-1] if user.modules else None
        if (owner in bn_inputs and bn_inputs[owner] == tensor_id and owner not in neutral
                and (user.func is F.batch_norm or owner in frozen)):
            info.batchnorm = owner
            return
        found = _activation(user, tensor_id)
        if found is not None:
            info.activation, info.activation_name = found
            return
        inside = [m for m in user.modules if m in neutral]
        outputs = [t for t in user.outputs if t != tensor_id]
        if not inside or len(user.outputs) != 1 or len(outputs) != 1:
            return
        tensor_id = outputs[0]
