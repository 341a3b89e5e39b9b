"""AdaRound post-training weight quantization for PyTorch (Nagel et al., ICML 2020).

Example:
    >>> import adaround
    >>> cfg = adaround.QuantConfig(weight_bits=4, per_channel=False, symmetric=True,
    ...                            rounding="adaround", iters=10000, batch_size=32, seed=0)
    >>> qmodel = adaround.quantize(model, calib, cfg)  # doctest: +SKIP
"""

from adaround.api import quantize
from adaround.config import QuantConfig
from adaround.errors import (
    AdaRoundError,
    CalibrationDataError,
    ConfigError,
    ExportError,
    ModelError,
    SaveFileError,
)
from adaround.export import export_aimet, export_encodings, export_onnx, read_encodings
from adaround.io import load, save
from adaround.nn.quant_layer import QuantLayer

__version__ = "0.1.0"

__all__ = [
    "AdaRoundError",
    "CalibrationDataError",
    "ConfigError",
    "ExportError",
    "ModelError",
    "QuantConfig",
    "QuantLayer",
    "SaveFileError",
    "__version__",
    "export_aimet",
    "export_encodings",
    "export_onnx",
    "load",
    "quantize",
    "read_encodings",
    "save",
]
