"""AdaRound post-training weight quantization for PyTorch (Nagel et al., ICML 2020).

Example:
    >>> import adaround
    >>> cfg = adaround.QuantConfig(weight_bits=4, per_channel=False, symmetric=True,
    ...                            rounding="adaround", iters=10000, batch_size=32, seed=0)
    >>> qmodel = adaround.quantize(model, calib, cfg)  # doctest: +SKIP
"""

from typing import TYPE_CHECKING, Any

from adaround.errors import (  # no torch here: the errors import in milliseconds
    AdaRoundError,
    CalibrationDataError,
    CheckpointError,
    ConfigError,
    EvaluationError,
    ExportError,
    ModelError,
    NumericalError,
    OutputPathError,
    SaveFileError,
)

if TYPE_CHECKING:
    from adaround.api import quantize
    from adaround.config import QuantConfig
    from adaround.export import export_encodings, export_onnx, read_encodings
    from adaround.io import load, save
    from adaround.nn.quant_layer import QuantLayer

__version__ = "0.1.0"

# imported on first use: `import adaround` (and `python -m adaround`) does not import torch
# until needed, so Ctrl-C while torch loads ends in the command line's handler, not a traceback
_LAZY = {"quantize": "adaround.api", "QuantConfig": "adaround.config",
         "export_encodings": "adaround.export", "export_onnx": "adaround.export",
         "read_encodings": "adaround.export", "load": "adaround.io", "save": "adaround.io",
         "QuantLayer": "adaround.nn.quant_layer"}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # a submodule, as eager imports would have made it an attribute
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'adaround' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AdaRoundError",
    "CalibrationDataError",
    "CheckpointError",
    "ConfigError",
    "EvaluationError",
    "ExportError",
    "ModelError",
    "NumericalError",
    "OutputPathError",
    "QuantConfig",
    "QuantLayer",
    "SaveFileError",
    "__version__",
    "export_encodings",
    "export_onnx",
    "load",
    "quantize",
    "read_encodings",
    "save",
]
