"""Numerical guards of a run: the calibration scale up front, every unit's data and losses.

A NaN made inside the model, or inputs so large that their squares overflow float32, would
otherwise run to the end with NaN/Inf losses and flip weights at random; these checks stop
the run at the first unit concerned, naming it and the likely cause.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from adaround.checkpoint import Checkpoint
from adaround.checks import check_output_path
from adaround.config import QuantConfig
from adaround.errors import CalibrationDataError, NumericalError

# squares of values above this (summed over a batch of outputs) come near float32's 3.4e38
MAX_ABS_INPUT = 1e12

CAUSES = ("likely causes: inputs on another scale than the model was trained on (normalize "
          "the calibration data as for training), or a NaN/Inf produced inside the model (check "
          "torch.isfinite(model(x)).all() on these inputs)")


def check_input_scale(x: Tensor) -> None:
    """Refuse calibration values whose squares overflow the reconstruction losses."""
    if not x.is_floating_point() or x.numel() == 0:
        return
    peak = float(x.detach().abs().max())
    if peak > MAX_ABS_INPUT:
        raise CalibrationDataError(
            f"calibration data reaches |x| = {peak:.3g}: the reconstruction losses (squares) "
            f"overflow at that scale; normalize the inputs as for training (|x| well below "
            f"{MAX_ABS_INPUT:.0e})")


def check_finite(name: str, what: str, value: Any) -> None:
    """Stop where a unit's inputs or targets hold NaN/Inf (tensors in memory; spilled ones
    are checked through their losses)."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() == 0:
        return
    # any NaN/Inf makes the sum NaN/Inf: one reduction, 5-10x cheaper than a bool mask; a
    # sum that overflows on finite values alone is then told apart by the mask
    if torch.isfinite(value.sum()):
        return
    for chunk in value.split(64):  # a bool mask of a few chunks, not of the whole cache
        if not torch.isfinite(chunk).all():
            raise NumericalError(f"{name}: its {what} hold NaN/Inf values; {CAUSES}")


def check_result(name: str, loss_nearest: float, loss_adaround: float) -> None:
    """Stop where a unit's reconstruction loss is NaN/Inf."""
    if not (math.isfinite(loss_nearest) and math.isfinite(loss_adaround)):
        raise NumericalError(
            f"{name}: the reconstruction loss is not finite (nearest {loss_nearest:.3g}, "
            f"adaround {loss_adaround:.3g}); {CAUSES}")


def open_checkpoint(folder: str | os.PathLike[str] | None, model: nn.Module,
                    x: Tensor | dict[str, Tensor], cfg: QuantConfig, rank: int = 0,
                    processes: int = 1, options: dict[str, Any] | None = None) -> Checkpoint:
    """The run's checkpoint (None: none), its folder checked writable before any work; in a
    process group of `processes`, process `rank` 0 writes it."""
    if folder is not None:
        check_output_path(os.path.join(os.fspath(folder), "progress.pt"), "checkpoint_dir")
    return Checkpoint(folder, model, x, cfg, writer=rank == 0, processes=processes,
                      options=options)
