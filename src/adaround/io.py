"""Save a quantized model (integer codes, scales, float biases, config) and load it back."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaround.api import META_ATTR
from adaround.calibration import model_device
from adaround.config import QuantConfig
from adaround.errors import SaveFileError
from adaround.nn.quant_layer import QuantLayer
from adaround.prepare import LayerPlan, apply_folds, swap_in_quant_layers

FORMAT = "adaround-quantized"
FORMAT_VERSION = 1


def _float_weight_keys(qmodel: nn.Module) -> set[str]:
    return {f"{n}.layer.weight" for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call `write(tmp_path)`, then rename onto `path`: never a half-written file at `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(qmodel: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the quantized state (without the float weights) of a `quantize` result."""
    meta = getattr(qmodel, META_ATTR, None)
    if meta is None:
        raise SaveFileError("this module was not produced by adaround.quantize: nothing to save")
    skip = _float_weight_keys(qmodel)
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items() if k not in skip}
    from adaround import __version__

    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "library": __version__,
               "meta": meta, "state": state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no quantized model file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SaveFileError(f"{path} is not a readable adaround file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SaveFileError(f"{path} is not an adaround quantized-model file")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise SaveFileError(
            f"{path} has format version {payload['format_version']}, newer than this "
            f"library reads ({FORMAT_VERSION}): upgrade adaround"
        )
    return payload


def load(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Rebuild the quantized model saved at `path` on top of `model` (the FP architecture)."""
    payload = _read(Path(path))
    meta = payload["meta"]
    cfg = QuantConfig.from_dict(meta["config"])
    qmodel = copy.deepcopy(model).eval()
    try:
        apply_folds(qmodel, meta["folded"])
        plans = [LayerPlan(name, bits, None) for name, bits in meta["layers"].items()]
        qmodel = swap_in_quant_layers(qmodel, plans, cfg, fit=False)
    except (AttributeError, TypeError) as exc:
        raise SaveFileError(
            f"{path} does not match this model's architecture ({exc}): pass the model it was "
            "quantized from"
        ) from exc
    device = model_device(model)
    state = {k: v.to(device) for k, v in payload["state"].items()}
    expected = set(qmodel.state_dict()) - _float_weight_keys(qmodel)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    mismatched = [k for k, v in state.items() if k in expected and
                  qmodel.state_dict()[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise SaveFileError(
            f"{path} does not match this model's architecture (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}): pass the model it "
            "was quantized from"
        )
    qmodel.load_state_dict(state, strict=False)
    for module in qmodel.modules():
        if isinstance(module, QuantLayer):
            module.mode = "quantized"
    setattr(qmodel, META_ATTR, meta)
    return qmodel
