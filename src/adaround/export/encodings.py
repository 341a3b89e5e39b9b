"""Encodings JSON for Qualcomm's toolchain (AIMET encoding format 0.6.1).

The file names tensors of the float ONNX graph (`export_onnx(..., qdq=False)`): parameter
encodings under the weight initializer's name (`<layer>.weight`), activation encodings under
the name of the tensor a quantized layer reads. Each encoding describes a grid as

    real = (q + offset) * scale,  q in [0, 2^bitwidth - 1],
    min = offset * scale,  max = (2^bitwidth - 1 + offset) * scale

so adaround's grids map as: symmetric (signed codes c in [-2^(b-1), 2^(b-1)-1], zero point 0)
-> q = c + 2^(b-1), offset = -2^(b-1), is_symmetric "True"; asymmetric (unsigned codes c, zero
point z) -> q = c, offset = -z, is_symmetric "False"; unsigned activations (zero point 0) ->
offset 0, is_symmetric "False". Per-channel grids give one encoding per output channel, in
channel order (ConvTranspose: the weight's axis 1). Scales are written as the float32 values
the model uses (a double in JSON that converts back exactly).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from adaround.api import META_ATTR
from adaround.checks import check_export, check_output_path
from adaround.errors import ExportError
from adaround.export.graph import (
    consumers,
    data_input,
    executed_layers,
    export_float_graph,
    float_twin,
    locate_weights,
    quant_layers,
)
from adaround.export.onnx_qdq import act_qparams, enabled_act_quant
from adaround.io import atomic_write
from adaround.nn.quant_layer import QuantLayer

log = logging.getLogger(__name__)

ENCODINGS_VERSION = "0.6.1"


def _entries(bits: int, symmetric: bool, scales: np.ndarray, offsets: np.ndarray
             ) -> list[dict[str, Any]]:
    if bits < 4:
        log.warning("%d-bit encodings are below the 4-bit minimum of the encoding format: the "
                    "toolchain may refuse them", bits)
    top = 2**bits - 1
    return [{"bitwidth": bits, "dtype": "int", "is_symmetric": str(symmetric),
             "max": float((top + o) * np.float64(s)), "min": float(o * np.float64(s)),
             "offset": int(o), "scale": float(s)} for s, o in zip(scales, offsets)]


def param_encoding(qlayer: QuantLayer) -> list[dict[str, Any]]:
    """The encodings of one QuantLayer's weight (one entry per channel when per channel)."""
    if qlayer.group_size is not None:
        raise ExportError(
            f"the encodings format {ENCODINGS_VERSION} has no group-wise grids "
            f"(group_size={qlayer.group_size}): export this model as ONNX (blocked "
            "DequantizeLinear) or as the packed file, or quantize per channel")
    scales = qlayer.scale.detach().cpu().float().reshape(-1).numpy()
    if qlayer.symmetric:
        offsets = np.full(scales.shape, -(2 ** (qlayer.bits - 1)), dtype=np.int64)
    else:
        zero = qlayer.zero_point.detach().cpu().double().reshape(-1).round().numpy()
        offsets = -zero.astype(np.int64)
    return _entries(qlayer.bits, qlayer.symmetric, scales, offsets)


def activation_encoding(act: nn.Module) -> list[dict[str, Any]]:
    bits, signed, scale = act_qparams(act)
    offset = -(2 ** (bits - 1)) if signed else 0
    scales = np.array([scale], dtype=np.float32)
    return _entries(bits, signed, scales, np.array([offset]))


def encodings_dict(qmodel: nn.Module, example_input: Tensor | tuple[Tensor, ...] | None = None
                   ) -> dict[str, Any]:
    """The encodings as a dict; names come from the float graph when `example_input` is given.

    Without it, parameters are named `<layer>.weight` (the exporter's names for them) and
    activation encodings cannot be named: a model with activation quantizers needs it.
    """
    layers = quant_layers(qmodel)
    params: dict[str, Any] = {}
    activations: dict[str, Any] = {}
    if example_input is None:
        if any(enabled_act_quant(q) is not None for _, q in layers):
            raise ExportError("this model quantizes activations: pass example_input so that "
                              "their encodings can name the ONNX tensors")
        params = {f"{name}.weight" if name else "weight": param_encoding(q) for name, q in layers}
    else:
        proto = export_float_graph(float_twin(qmodel), example_input)
        for site in locate_weights(proto, qmodel, executed_layers(qmodel, example_input)):
            params[site.initializer] = param_encoding(site.qlayer)
            act = enabled_act_quant(site.qlayer)
            if act is None:
                continue
            for node in consumers(proto, site.initializer):
                tensor = node.input[data_input(proto, node, site.initializer)]
                encoding = activation_encoding(act)
                if activations.get(tensor, encoding) != encoding:
                    raise ExportError(f"tensor {tensor} feeds layers with different activation "
                                      "grids: one encoding per tensor is all the format holds")
                activations[tensor] = encoding
    cfg = getattr(qmodel, META_ATTR, {}).get("config", {})
    act_bits = {e[0]["bitwidth"] for e in activations.values()}
    return {
        "version": ENCODINGS_VERSION,
        "activation_encodings": activations,
        "param_encodings": params,
        "excluded_layers": [],
        "quantizer_args": {
            "activation_bitwidth": act_bits.pop() if len(act_bits) == 1 else 32,
            "dtype": "int",
            "is_symmetric": str(cfg.get("symmetric", layers[0][1].symmetric)),
            "param_bitwidth": cfg.get("weight_bits", layers[0][1].bits),
            "per_channel_quantization": str(cfg.get("per_channel",
                                                    layers[0][1].axis is not None)),
            "quant_scheme": f"adaround ({cfg.get('rounding', 'adaround')} rounding, "
                            f"{cfg.get('scale_method', 'mse')} grid)",
        },
    }


def export_encodings(qmodel: nn.Module, path: str | os.PathLike[str],
                     example_input: Tensor | tuple[Tensor, ...] | None = None) -> Path:
    """Write the encodings JSON of `qmodel` to `path` (atomically); returns the path.

    Example:
        >>> x = torch.randn(1, 3, 32, 32)
        >>> adaround.export_encodings(qmodel, "model.encodings", x)  # doctest: +SKIP
    """
    check_export(qmodel, example_input, example_required=False)
    check_output_path(path)
    text = json.dumps(encodings_dict(qmodel, example_input), indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    log.info("wrote %s", path)
    return Path(path)


def read_encodings(source: str | os.PathLike[str] | dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Grids of an encodings file, per tensor: kind, bits, signed, scale and zero point arrays.

    `signed` is True for a symmetric encoding with offset -2^(bits-1) (adaround's signed codes,
    zero point 0); otherwise the codes are unsigned with zero_point = -offset.
    """
    data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    grids: dict[str, dict[str, Any]] = {}
    for kind in ("param", "activation"):
        for name, entries in data.get(f"{kind}_encodings", {}).items():
            bits = {int(e["bitwidth"]) for e in entries}
            if len(bits) != 1:
                raise ExportError(f"{name}: channels with different bit widths {sorted(bits)}")
            b = bits.pop()
            offsets = np.array([int(e["offset"]) for e in entries], dtype=np.int64)
            symmetric = all(str(e.get("is_symmetric", "False")) == "True" for e in entries)
            signed = symmetric and bool((offsets == -(2 ** (b - 1))).all())
            grids[name] = {
                "kind": kind, "bits": b, "signed": signed,
                "scale": np.array([e["scale"] for e in entries], dtype=np.float32),
                "zero_point": np.zeros_like(offsets) if signed else -offsets,
            }
    return grids
