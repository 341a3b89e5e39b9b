"""Errors raised for bad input. Each message names the problem and the fix."""

from __future__ import annotations


class AdaRoundError(ValueError):
    """Base class of every error this library raises for bad input."""


class ConfigError(AdaRoundError):
    """An option has a value outside what it accepts."""


class CalibrationDataError(AdaRoundError):
    """The calibration data is empty, too small, malformed or not finite."""


class ModelError(AdaRoundError):
    """The model cannot be quantized as given (no quantizable layer, NaN weights, ...)."""


class SaveFileError(AdaRoundError):
    """A saved quantized model cannot be loaded into the given network."""


class ExportError(AdaRoundError):
    """A quantized model cannot be exported as asked (missing package, unmappable layer...)."""


class OutputPathError(AdaRoundError):
    """An output path cannot be written (a directory, under a file, read-only, ...)."""


class CheckpointError(AdaRoundError):
    """A checkpoint directory belongs to another run (model, data or config) or is unusable."""


class NumericalError(AdaRoundError):
    """Activations or losses became NaN/Inf during reconstruction."""


class EvaluationError(AdaRoundError):
    """Evaluation data the model cannot be scored on (labels out of range, wrong shape)."""
