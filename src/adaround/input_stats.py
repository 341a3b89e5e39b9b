"""What the calibration inputs looked like, kept in the saved file, and how later inputs differ.

A model quantized on normalized 32x32 RGB images and evaluated on raw [0, 255] pixels, another
resolution, or without the same mean/std scores near chance without any error. `describe`
stores the per-sample shape, the range and per-channel mean/std of the calibration data in
the quantized model's metadata; `differences` compares new inputs with them, and `warn_if_unlike`
logs what differs (files saved before this existed have no statistics: nothing is checked).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

KEY = "input_stats"
MAX_CHANNELS = 64  # beyond: not images; one mean/std for all values
SAMPLE = 4096


def _channels(x: Tensor) -> Tensor:
    """[C, values] for image-like inputs (dim 1 holds at most MAX_CHANNELS), else [1, values]."""
    x = x[:SAMPLE].detach().float().cpu()
    if x.dim() >= 3 and x.shape[1] <= MAX_CHANNELS:
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    return x.reshape(1, -1)


def describe(x: Tensor) -> dict[str, Any] | None:
    """Statistics of floating-point calibration inputs, as plain JSON values."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        return None
    per = _channels(x)
    return {"shape": list(x.shape[1:]), "min": float(per.min()), "max": float(per.max()),
            "mean": [round(float(v), 6) for v in per.mean(1)],
            "std": [round(float(v), 6) for v in per.std(1)]}


def _fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def differences(stats: dict[str, Any], x: Tensor) -> list[str]:
    """How `x` differs from the calibration inputs described by `stats` (empty: alike)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        return []
    found = []
    shape = list(x.shape[1:])
    if shape != stats["shape"]:
        found.append(f"each input has shape {tuple(shape)}, the calibration inputs had "
                     f"{tuple(stats['shape'])} (channels or resolution differ)")
        if len(shape) != len(stats["shape"]) or shape[:1] != stats["shape"][:1]:
            return found  # channels differ: per-channel statistics do not compare
    now = describe(x)
    assert now is not None
    span = max(stats["max"] - stats["min"], 1e-12)
    if now["min"] < stats["min"] - span / 2 or now["max"] > stats["max"] + span / 2:
        found.append(f"inputs span [{now['min']:.3g}, {now['max']:.3g}], the calibration "
                     f"inputs [{stats['min']:.3g}, {stats['max']:.3g}]")
    mean, std = torch.tensor(now["mean"]), torch.tensor(now["std"])
    ref_mean, ref_std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    if mean.shape == ref_mean.shape:
        shifted = ((mean - ref_mean).abs() > 0.5 * ref_std.clamp_min(1e-12)).any()
        scaled = ((std / ref_std.clamp_min(1e-12)) - 1).abs().max() > 0.5
        if shifted or scaled:
            found.append(f"per-channel mean {_fmt(now['mean'])} / std {_fmt(now['std'])}, the "
                         f"calibration inputs' {_fmt(stats['mean'])} / {_fmt(stats['std'])}")
    return found


def warn_if_unlike(model: nn.Module, x: Tensor) -> list[str]:
    """Log a warning where `x` differs from the inputs `model` was quantized on."""
    from adaround.api import META_ATTR

    stats = (getattr(model, META_ATTR, None) or {}).get(KEY)
    if not isinstance(stats, dict):
        return []
    try:
        found = differences(stats, x)
    except (KeyError, TypeError, ValueError):  # statistics of an unexpected form: skip
        return []
    if found:
        log.warning("these inputs are unlike the calibration data: %s; the accuracy will "
                    "suffer unless they are preprocessed the same way (same --mean/--std, size "
                    "and channels)", "; ".join(found))
    return found
