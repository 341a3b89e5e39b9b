"""Grids as aimet-torch reads them back: exact min/max, AIMET's minimum scale, entry layouts.

aimet-torch's `set_legacy_encodings` (what `QuantizationSimModel.load_encodings` calls) keeps
only `bitwidth`, `is_symmetric`, `min` and `max` of an encoding and derives, in float32,

    scale = (max - min) / (2^b - 1),   offset = round(min / scale) (asymmetric; symmetric: fixed)

then clamps the scale to at least float32's eps (`_get_minimum_scale`). So that AIMET
recomputes *exactly* the scale the simulated model uses, `exact_range` picks float32 values of
min and max (within a few ulps of offset * s and (2^b - 1 + offset) * s) for which that
division gives s back bit for bit; scales below AIMET's minimum must be raised first
(`raise_small_scales`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from adaround.nn.quant_layer import QuantLayer

log = logging.getLogger(__name__)

AIMET_MIN_SCALE = float(np.finfo(np.float32).eps)  # aimet-torch's minimum for 4 to 16 bits
_SEARCH_ULPS = 64
_LO_ULPS = 16


def exact_range(scale: float, offset: int, bits: int) -> tuple[float, float, float]:
    """float32 (min, max) from which AIMET's float32 arithmetic recomputes `scale` (and, for
    an asymmetric grid, `offset` as round(min / scale)), and the scale AIMET reads: `scale`
    itself, or for the few scales that no float32 pair gives back, the nearest one that does
    (an ulp or two away)."""
    s = np.float32(scale)
    steps = np.float32(2**bits - 1)
    lo0 = np.float32(np.float64(offset) * np.float64(s))
    hi0 = np.float32(np.float64(2**bits - 1 + offset) * np.float64(s))
    ulps = np.arange(-_SEARCH_ULPS, _SEARCH_ULPS + 1)
    ulps = ulps[np.argsort(np.abs(ulps), kind="stable")]  # nearest candidates first
    his = _step(hi0, ulps)
    los = _step(lo0, ulps[: 2 * _LO_ULPS + 1]) if lo0 != 0 else np.array([lo0])
    best = (np.inf, float(lo0), float(hi0), float(s))
    with np.errstate(all="ignore"):
        for lo in los:  # float32 subtraction and division, as torch does them
            back = (his - lo) / steps
            valid = (np.round(lo / back) == offset) & (back > 0)
            error = np.where(valid, np.abs(back.astype(np.float64) - np.float64(s)), np.inf)
            i = int(np.argmin(error))
            if error[i] == 0:
                return float(lo), float(his[i]), float(s)
            if error[i] < best[0]:
                best = (error[i], float(lo), float(his[i]), float(back[i]))
    return best[1], best[2], best[3]


def _step(value: np.float32, ulps: np.ndarray) -> np.ndarray:
    """`value` moved by each count of float32 ulps."""
    bits = np.array([value], dtype=np.float32).view(np.int32)[0]
    sign = -1 if value < 0 else 1
    return (bits + sign * ulps.astype(np.int64)).astype(np.int32).view(np.float32)


def legacy_entries(bits: int, symmetric: bool, scales: np.ndarray, offsets: np.ndarray
                   ) -> list[dict[str, Any]]:
    """Encodings in the 0.6.1 entry layout, with min/max that AIMET reads back exactly."""
    out = []
    for s, o in zip(scales.astype(np.float32), offsets):
        lo, hi, read = exact_range(float(s), int(o), bits)
        out.append({"bitwidth": bits, "dtype": "int", "is_symmetric": str(symmetric),
                    "max": hi, "min": lo, "offset": int(o), "scale": read})
    return out


def v1_entry(name: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One tensor's 0.6.1 entries as a 1.0.0 encoding (aimet's `to_qnn_encoding_dict`)."""
    first = entries[0]
    return {
        "name": name, "dtype": "INT", "bw": int(first["bitwidth"]),
        "is_sym": str(first["is_symmetric"]) == "True",
        "enc_type": "PER_CHANNEL" if len(entries) > 1 else "PER_TENSOR",
        "scale": [float(e["scale"]) for e in entries],
        "offset": [int(e["offset"]) for e in entries],
    }


@torch.no_grad()
def aimet_ready(qmodel: nn.Module) -> None:
    """Make every grid of `qmodel` (in place) one that AIMET reads exactly: scales below its
    minimum raised, the rest moved (by an ulp or two, where needed) to a value that AIMET's
    min/max arithmetic gives back; the weights are then codes times those scales."""
    raise_small_scales(qmodel)
    moved = 0
    for module in qmodel.modules():
        if isinstance(module, QuantLayer):
            flat = module.scale.view(-1)
            zero = module.zero_point.reshape(-1)
            for i in range(flat.numel()):
                offset = -(2 ** (module.bits - 1)) if module.symmetric else -int(zero[i])
                read = exact_range(float(flat[i]), offset, module.bits)[2]
                moved += read != float(flat[i])
                flat[i] = read
        act = getattr(module, "act_quant", None)
        if act is not None:
            offset = -(2 ** (act.bits - 1)) if act.signed else 0
            read = exact_range(float(act.scale), offset, act.bits)[2]
            moved += read != float(act.scale)
            act.scale.fill_(read)
    if moved:
        log.info("%d scale(s) moved by an ulp or two to values that AIMET's float32 min/max "
                 "arithmetic reproduces exactly", moved)


@torch.no_grad()
def raise_small_scales(qmodel: nn.Module) -> int:
    """Raise every scale below AIMET's minimum to it, re-rounding those weights to nearest on
    the raised grid (weights below about 1e-6: nearly dead channels); returns how many scales
    changed. AIMET would clamp them on loading and read other weights than the model has."""
    changed = 0
    for _, module in qmodel.named_modules():
        if isinstance(module, QuantLayer):
            small = module.scale < AIMET_MIN_SCALE
            if small.any():
                weight = module.quantized_weight()
                module.scale[small] = AIMET_MIN_SCALE
                codes = torch.round(weight / module.weight_scale() + module.weight_zero_point())
                module.codes.copy_(codes.clamp(module.qmin, module.qmax).to(module.codes.dtype))
                changed += int(small.sum())
        act = getattr(module, "act_quant", None)
        if act is not None and float(act.scale) < AIMET_MIN_SCALE:
            act.scale.fill_(AIMET_MIN_SCALE)
            changed += 1
    if changed:
        log.warning("%d scale(s) below AIMET's minimum (float32 eps, %.3g) raised to it; "
                    "their weights re-rounded to nearest on that grid", changed, AIMET_MIN_SCALE)
    return changed
