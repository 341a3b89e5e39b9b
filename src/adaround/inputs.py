"""Models with several inputs: calibration batches of tuples (positional inputs) or dicts
(keyword inputs, e.g. `pixel_values=`, `input_ids=` and `attention_mask=`).

The whole pipeline works on one tensor of calibration samples. A model with several inputs is
quantized through `IndexedInputs`, which holds the inputs and calls the model on the samples
selected by a tensor of indices; that index tensor is then the calibration data. The module
names inside it carry the prefix `model.`, removed from the result.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adaround.errors import CalibrationDataError

PREFIX = "model."


@dataclass
class Structured:
    """Calibration inputs of a model with several inputs, each [N, ...]."""

    args: list[Tensor] = field(default_factory=list)
    kwargs: dict[str, Tensor] = field(default_factory=dict)

    def count(self) -> int:
        return next(iter([*self.args, *self.kwargs.values()])).shape[0]


def positional_inputs(model: nn.Module) -> int:
    """The number of required positional inputs of `model.forward` (1 where unknown)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return max(1, sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params))


def _tensor(value: Any) -> Tensor | None:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value if isinstance(value, Tensor) else None


def _batch(value: Any, arity: int) -> Structured | None:
    """One batch as a Structured, if it is a dict of tensors or a tuple of `arity` inputs."""
    if isinstance(value, Mapping) and value:
        tensors = {k: _tensor(v) for k, v in value.items()}
        if all(t is not None for t in tensors.values()):
            return Structured(kwargs=tensors)  # type: ignore[arg-type]
        return None
    if arity >= 2 and isinstance(value, (tuple, list)) and len(value) >= arity:
        tensors = [_tensor(v) for v in value[:arity]]
        if all(t is not None for t in tensors):
            return Structured(args=tensors)  # type: ignore[arg-type]
    return None


def collect_structured(calib: Any, model: nn.Module) -> Structured | None:
    """The calibration data as several inputs, or None where it is one input per sample
    (a tensor, an iterable of tensors or of (input, label) pairs: the ordinary path)."""
    arity = positional_inputs(model)
    single = _batch(calib, arity) if isinstance(calib, (Mapping, tuple)) else None
    if single is not None:
        return _checked([single])
    if isinstance(calib, (Tensor, np.ndarray, str, bytes, Mapping)) or not isinstance(
            calib, Iterable):
        return None
    batches = []
    for item in calib:
        batch = _batch(item, arity)
        if batch is None:
            return None if not batches else _mixed()
        batches.append(batch)
    return _checked(batches) if batches else None


def _mixed() -> Structured:
    raise CalibrationDataError("calibration batches mix several-input batches (tuples or dicts) "
                               "with other items: pass batches of one form")


def _checked(batches: list[Structured]) -> Structured:
    first = batches[0]
    if any(len(b.args) != len(first.args) or b.kwargs.keys() != first.kwargs.keys()
           for b in batches):
        raise CalibrationDataError("calibration batches disagree in their inputs (number of "
                                   "positional inputs or dict keys): pass batches of one form")
    args = [torch.cat([b.args[i] for b in batches]) for i in range(len(first.args))]
    kwargs = {k: torch.cat([b.kwargs[k] for b in batches]) for k in first.kwargs}
    counts = {t.shape[0] for t in [*args, *kwargs.values()]}
    if len(counts) != 1:
        raise CalibrationDataError(f"the inputs of one calibration batch hold different numbers "
                                   f"of samples ({sorted(counts)}): give every input the same "
                                   "first (batch) dimension")
    if 0 in counts:
        raise CalibrationDataError("calibration data is empty: pass a few hundred inputs")
    return Structured(args, kwargs)


class IndexedInputs(nn.Module):
    """Calls `model` on the calibration samples picked by a tensor of indices."""

    def __init__(self, model: nn.Module, inputs: Structured) -> None:
        super().__init__()
        self.model = model
        self.n_args = len(inputs.args)
        self.keys = list(inputs.kwargs)
        for i, t in enumerate(inputs.args):
            self.register_buffer(f"arg{i}", t, persistent=False)
        for i, t in enumerate(inputs.kwargs.values()):
            self.register_buffer(f"kwarg{i}", t, persistent=False)

    def forward(self, index: Tensor) -> Any:
        args = [getattr(self, f"arg{i}")[index] for i in range(self.n_args)]
        kwargs = {k: getattr(self, f"kwarg{i}")[index] for i, k in enumerate(self.keys)}
        return self.model(*args, **kwargs)


def strip_prefix(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name
