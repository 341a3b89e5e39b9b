"""Turn what users pass as calibration data into one checked tensor of inputs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adaround.errors import CalibrationDataError, ModelError

EMPTY = "calibration data is empty: pass a few hundred unlabelled inputs (the paper uses 1024)"


def _input_of(batch: Any) -> Tensor:
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch)
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (Tensor, np.ndarray)):
        return _input_of(batch[0])  # (input, label) pairs: labels are ignored
    raise CalibrationDataError(
        f"a calibration batch is a {type(batch).__name__}; expected a tensor or an "
        "(input, label) tuple: pass a tensor, an iterable of tensors or a DataLoader"
    )


def collect_calibration(calib: Any, limit: int | None = None) -> Tensor:
    """Concatenate the calibration inputs (labels dropped) into one tensor [N, ...]."""
    if isinstance(calib, (Tensor, np.ndarray)):
        x = _input_of(calib)
        if x.dim() == 0:
            raise CalibrationDataError("calibration data is a scalar: pass a batch of inputs")
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes, dict)):
        parts: list[Tensor] = []
        count = 0
        for batch in calib:
            part = _input_of(batch)
            if parts and part.shape[1:] != parts[0].shape[1:]:
                raise CalibrationDataError(
                    f"calibration batches disagree in shape: {tuple(parts[0].shape[1:])} then "
                    f"{tuple(part.shape[1:])} per sample; resize the inputs to one shape"
                )
            parts.append(part)
            count += part.shape[0] if part.dim() else 1
            if limit is not None and count >= limit:
                break
        if not parts:
            raise CalibrationDataError(EMPTY)
        x = torch.cat([p.to(parts[0].device) for p in parts])
    else:
        raise CalibrationDataError(
            f"calibration data of type {type(calib).__name__} is not supported: pass a tensor, "
            "an iterable of tensors or (input, label) tuples, or a DataLoader"
        )
    if limit is not None:
        x = x[:limit]
    if x.shape[0] == 0:
        raise CalibrationDataError(EMPTY)
    if x.is_floating_point():
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise CalibrationDataError(
                f"calibration data holds {bad} NaN/Inf values: clean or drop those samples"
            )
    return x


def check_quantizable(model: Any) -> None:
    """Refuse, by name, what `quantize` cannot take: not an nn.Module, a TorchScript or
    torch.export program, weights on the meta device, a model quantized already."""
    if type(model).__name__ == "ExportedProgram":
        raise ModelError("a torch.export program cannot be quantized: pass the nn.Module it "
                         "was exported from (quantize, then export the result)")
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError("a TorchScript module cannot be quantized: pass the Python nn.Module "
                         "it was scripted or traced from")
    from adaround.checks import check_model

    check_model(model)  # an nn.Module, or a message naming what it is
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise ModelError(f"{name} is on the meta device (no values): load the weights "
                             "first, e.g. model.to_empty(device='cpu') then load_state_dict")
    from adaround.nn.quant_layer import QuantLayer

    if hasattr(model, "adaround_meta") or any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ModelError("this model is already quantized by adaround: pass the float model "
                         "(adaround.load(path, float_model) rebuilds a saved result)")


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers hold NaN or Inf."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(
                f"{name} holds NaN/Inf values: the model is broken; load valid weights before "
                "quantizing"
            )


def model_device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")
