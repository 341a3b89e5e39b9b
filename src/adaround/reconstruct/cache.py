"""Inputs and targets of one layer, captured from the FP and the partly quantized network.

Asymmetric reconstruction (paper, eq. 25): the layer's input x^ comes from the network whose
earlier layers are already rounded, its target f_a(W x) from the FP network. Each forward pass
stops as soon as the layer has been reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from adaround.errors import ModelError


class _Reached(Exception):
    """Raised by a hook to stop the forward pass once the layer's input is captured."""


@contextmanager
def _capture_input(module: nn.Module, sink: list[Tensor]) -> Iterator[None]:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        sink.append(args[0].detach())
        raise _Reached

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def layer_inputs(model: nn.Module, layer: nn.Module, batches: list[Tensor]) -> Tensor:
    """The input of `layer` for every batch (each forward pass stops at the layer)."""
    inputs: list[Tensor] = []
    with torch.no_grad(), _capture_input(layer, inputs):
        for i, batch in enumerate(batches):
            try:
                model(batch)
            except _Reached:
                pass
            if len(inputs) != i + 1:
                name = next((n for n, m in model.named_modules() if m is layer), "?")
                raise not_called(name, layer)
    return torch.cat(inputs)


def not_called(name: str, module: nn.Module) -> ModelError:
    """The error for a layer or block that the forward pass skips on some calibration data."""
    return ModelError(
        f"{name} ({type(module).__name__}) is not called for every calibration batch: the "
        "model's forward takes data-dependent branches around it; exclude it "
        f"(exclude=({name!r},)) or make the branch independent of the data")


def layer_target(layer: nn.Module, x_fp: Tensor,
                 activation: Callable[[Tensor], Tensor] | None) -> Tensor:
    """f_a(W x): the FP layer's output on its FP input, after the following activation."""
    with torch.no_grad():
        target = torch.cat([layer(chunk) for chunk in x_fp.split(256)])
        return activation(target) if activation is not None else target


def collect_layer_data(
    fp_model: nn.Module,
    q_model: nn.Module,
    name: str,
    batches: list[Tensor],
    activation: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """(x^, target): the layer's quantized-stream input and f_a(W x) from the FP stream."""
    fp_layer = fp_model.get_submodule(name)
    target = layer_target(fp_layer, layer_inputs(fp_model, fp_layer, batches), activation)
    x_q = layer_inputs(q_model, q_model.get_submodule(name), batches)
    return x_q, target


def collect_input_chunks(
    fp_model: nn.Module, q_model: nn.Module, name: str, batches: list[Tensor]
) -> Iterator[tuple[Tensor, Tensor]]:
    """(x^, x) batch by batch: the layer's quantized- and FP-stream inputs, never all at once."""
    fp_layer, q_layer = fp_model.get_submodule(name), q_model.get_submodule(name)
    for batch in batches:
        yield layer_inputs(q_model, q_layer, [batch]), layer_inputs(fp_model, fp_layer, [batch])
