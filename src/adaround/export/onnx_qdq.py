"""ONNX QDQ export: integer weight initializers feeding DequantizeLinear, onnxruntime-ready.

Each QuantLayer's weight becomes an INT4/UINT4 initializer (weights of 2-4 bits; ONNX has no
narrower type before opset 25, so 2- and 3-bit codes take 4-bit fields) or INT8/UINT8 (5-8
bits), a float scale (per tensor: a scalar; per channel: one per output channel, with
DequantizeLinear's `axis` the QuantLayer's `axis`, 1 for ConvTranspose) and, for asymmetric
grids, a zero point of the same integer type. Signed codes are stored as they are (zero point
0); unsigned codes with their zero point, as in QuantLayer. Where a QuantLayer has an enabled
activation quantizer (`act_quant`), its input goes through QuantizeLinear/DequantizeLinear
in INT8/UINT8, after a Clip to the grid for fewer than 8 bits (QuantizeLinear saturates to its
type's range only). Activations do not use the 4-bit types: onnxruntime 1.32's ReluQuantFusion
drops a Relu in front of an INT4 QuantizeLinear with zero point 0 as if it saturated at 0 (it
saturates at -8), which changes the results of signed 4-bit activations after a ReLU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from adaround.errors import ExportError
from adaround.export.graph import (
    WeightSite,
    consumers,
    data_input,
    executed_layers,
    export_float_graph,
    float_twin,
    locate_weights,
    require_onnx,
)
from adaround.io import atomic_write
from adaround.nn.quant_layer import QuantLayer
from adaround.primitives import int_range

log = logging.getLogger(__name__)


def code_dtype(bits: int, signed: bool) -> Any:
    """The numpy dtype of `bits`-bit codes: ml_dtypes' int4/uint4 (ONNX INT4/UINT4) or 8-bit."""
    import ml_dtypes

    if bits <= 4:
        return ml_dtypes.int4 if signed else ml_dtypes.uint4
    return np.int8 if signed else np.uint8


def export_onnx(qmodel: nn.Module, example_input: Tensor | tuple[Tensor, ...],
                path: str | os.PathLike[str], *, qdq: bool = True,
                dynamic_batch: bool = True) -> Path:
    """Write `qmodel` as an ONNX file (opset 21) that onnxruntime runs; returns the path.

    With `qdq=False` the weights stay float (their dequantized values) and no activation is
    quantized: the graph that `export_encodings` describes.

    Example:
        >>> adaround.export_onnx(qmodel, torch.randn(1, 3, 32, 32), "model.onnx")  # doctest: +SKIP
    """
    onnx = require_onnx()
    proto = build_onnx(qmodel, example_input, qdq=qdq, dynamic_batch=dynamic_batch)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    log.info("wrote %s (%s)", path, "QDQ" if qdq else "float weights")
    return Path(path)


def build_onnx(qmodel: nn.Module, example_input: Tensor | tuple[Tensor, ...], *,
               qdq: bool = True, dynamic_batch: bool = True) -> Any:
    """The ONNX ModelProto that `export_onnx` writes."""
    onnx = require_onnx()
    proto = export_float_graph(float_twin(qmodel), example_input, dynamic_batch)
    if not qdq:
        return proto
    sites = locate_weights(proto, qmodel, executed_layers(qmodel, example_input))
    for site in sites:
        quantize_activation(proto, site)
    done: set[str] = set()
    for site in sites:
        if site.initializer not in done:  # identical weights may share one initializer
            quantize_weight(proto, site)
            done.add(site.initializer)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the QDQ graph does not validate ({exc}); please report this "
                          "model") from exc
    return proto


def _initializer(proto: Any, name: str, array: np.ndarray) -> str:
    """Add an initializer; numpy_helper packs 4-bit (ml_dtypes) arrays two values per byte."""
    from onnx import numpy_helper

    proto.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def quantize_weight(proto: Any, site: WeightSite) -> None:
    """Replace the float weight initializer by integer codes -> DequantizeLinear."""
    from onnx import helper

    qlayer = site.qlayer
    codes = qlayer.codes.detach().cpu().numpy()
    axis = qlayer.axis
    if site.transposed:
        codes = codes.T
        axis = None if axis is None else 1 - axis
    np_type = code_dtype(qlayer.bits, qlayer.symmetric)
    scale = qlayer.scale.detach().cpu().float().numpy()
    zero_point = qlayer.zero_point.detach().cpu().double().round().numpy()
    shape: tuple[int, ...] = () if axis is None else (codes.shape[axis],)
    attrs: dict[str, int] = {} if axis is None else {"axis": axis}
    if qlayer.group_size is not None:
        # blocked quantization (opset 21): scale [C_out, C_in / g] blocked along the input axis
        scale, zero_point = (scale.T, zero_point.T) if site.transposed else (scale, zero_point)
        shape = scale.shape
        attrs = {"axis": 0 if site.transposed else 1, "block_size": qlayer.group_size}
    name = site.initializer
    inputs = [
        _initializer(proto, f"{name}_quantized", codes.astype(np_type)),
        _initializer(proto, f"{name}_scale", scale.reshape(shape)),
    ]
    if not qlayer.symmetric:
        inputs.append(_initializer(proto, f"{name}_zero_point",
                                   zero_point.reshape(shape).astype(np_type)))
    node = helper.make_node("DequantizeLinear", inputs, [name], name=f"{name}_DequantizeLinear",
                            **attrs)
    kept = [init for init in proto.graph.initializer if init.name != name]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    proto.graph.node.insert(0, node)


def enabled_act_quant(qlayer: QuantLayer) -> nn.Module | None:
    """The layer's input quantizer (issue #3's interface), if it has one switched on."""
    act = getattr(qlayer, "act_quant", None)
    if act is None or not getattr(act, "enabled", True):
        return None
    return act


def act_qparams(act: nn.Module) -> tuple[int, bool, float]:
    bits, signed = int(act.bits), bool(act.signed)
    scale = float(act.scale.detach().reshape(-1)[0])
    if act.scale.numel() != 1 or not scale > 0:
        raise ExportError("activation quantizers must have one positive scale (per tensor)")
    return bits, signed, scale


def quantize_activation(proto: Any, site: WeightSite) -> None:
    """Put QuantizeLinear -> DequantizeLinear on the layer's activation input."""
    from onnx import helper

    act = enabled_act_quant(site.qlayer)
    if act is None:
        return
    bits, signed, scale = act_qparams(act)
    qmin, qmax = int_range(bits, signed)
    np_type = np.int8 if signed else np.uint8
    base = f"{site.layer or 'model'}.input"
    s = _initializer(proto, f"{base}_scale", np.array(scale, dtype=np.float32))
    z = _initializer(proto, f"{base}_zero_point", np.array(0, dtype=np_type))
    users = consumers(proto, site.initializer)
    if not users:
        raise ExportError(f"no node uses the weight of {site.layer}: cannot place its input "
                          "quantizer")
    for i, node in enumerate(users):
        index = data_input(proto, node, site.initializer)
        source, nodes = node.input[index], []
        tag = base if len(users) == 1 else f"{base}{i}"
        if bits < 8:  # QuantizeLinear saturates to the 8-bit type's range, not to the grid
            lo = _initializer(proto, f"{tag}_min", np.array(qmin * scale, dtype=np.float32))
            hi = _initializer(proto, f"{tag}_max", np.array(qmax * scale, dtype=np.float32))
            nodes.append(helper.make_node("Clip", [source, lo, hi], [f"{tag}_clipped"],
                                          name=f"{tag}_Clip"))
            source = f"{tag}_clipped"
        nodes.append(helper.make_node("QuantizeLinear", [source, s, z], [f"{tag}_q"],
                                      name=f"{tag}_QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", s, z], [f"{tag}_dq"],
                                      name=f"{tag}_DequantizeLinear"))
        node.input[index] = f"{tag}_dq"
        position = list(proto.graph.node).index(node)
        for offset, new in enumerate(nodes):
            proto.graph.node.insert(position + offset, new)
