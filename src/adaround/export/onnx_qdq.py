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
from torch import nn

from adaround.checks import check_export, check_output_path
from adaround.errors import ExportError
from adaround.export.graph import (
    ExampleInput,
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

WEIGHT_FORMS = ("qdq", "scaled")
# onnxruntime fuses weight DequantizeLinear -> MatMul into MatMulNBits, whose default accuracy
# level (4) quantizes the activations to int8; level 1 computes in float32.
EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def exact_session_options() -> Any:
    """onnxruntime SessionOptions under which a weight-only QDQ export computes as the
    simulated model (MatMulNBits in float32 instead of int8 activations).

    Example:
        >>> sess = onnxruntime.InferenceSession("m.onnx", exact_session_options())  # doctest: +SKIP
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in EXACT_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return options


def code_dtype(bits: int, signed: bool) -> Any:
    """The numpy dtype of `bits`-bit codes: ml_dtypes' int4/uint4 (ONNX INT4/UINT4) or 8-bit."""
    import ml_dtypes

    if bits <= 4:
        return ml_dtypes.int4 if signed else ml_dtypes.uint4
    return np.int8 if signed else np.uint8


def export_onnx(qmodel: nn.Module, example_input: ExampleInput,
                path: str | os.PathLike[str], *, qdq: bool = True,
                dynamic_batch: bool = True, weight_form: str = "qdq") -> Path:
    """Write `qmodel` as an ONNX file (opset 21, IR 10) that onnxruntime runs; returns the path.

    With `qdq=False` the weights stay float (their dequantized values) and no activation is
    quantized: the graph that `export_encodings` describes. `example_input` may be a dict of
    named tensors (a tokenizer's output, for Hugging Face models): named graph inputs with
    dynamic batch and sequence axes. `weight_form="scaled"` writes each weight as its codes ->
    DequantizeLinear at scale 1 -> Mul by the scale: onnxruntime's default session then runs
    MatMul/Gemm layers in float, as the simulated model does (with the default "qdq" form it
    fuses DequantizeLinear -> MatMul into MatMulNBits, which quantizes the activations to
    8 bits unless the session sets `exact_session_options()`; docs/onnxruntime.md).

    Example:
        >>> adaround.export_onnx(qmodel, torch.randn(1, 3, 32, 32), "model.onnx")  # doctest: +SKIP
    """
    check_export(qmodel, example_input)
    check_output_path(path)
    onnx = require_onnx()
    proto = build_onnx(qmodel, example_input, qdq=qdq, dynamic_batch=dynamic_batch,
                       weight_form=weight_form)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    log.info("wrote %s (%s)", path, "QDQ" if qdq else "float weights")
    return Path(path)


def build_onnx(qmodel: nn.Module, example_input: ExampleInput, *,
               qdq: bool = True, dynamic_batch: bool = True, weight_form: str = "qdq") -> Any:
    """The ONNX ModelProto that `export_onnx` writes."""
    onnx = require_onnx()
    if weight_form not in WEIGHT_FORMS:
        raise ExportError(f"weight_form={weight_form!r}: choose one of {', '.join(WEIGHT_FORMS)}")
    proto = export_float_graph(float_twin(qmodel), example_input, dynamic_batch)
    if not qdq:
        return proto
    sites = locate_weights(proto, qmodel, executed_layers(qmodel, example_input))
    for site in sites:
        quantize_activation(proto, site)
    done: set[str] = set()
    for site in sites:
        if site.initializer not in done:  # identical weights may share one initializer
            quantize_weight(proto, site, weight_form)
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


def quantize_weight(proto: Any, site: WeightSite, weight_form: str = "qdq") -> None:
    """Replace the float weight initializer by integer codes -> DequantizeLinear ("qdq"), or
    by codes -> DequantizeLinear at scale 1 -> Mul by the scale ("scaled")."""
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
    nodes = []
    dq_out, dq_scale = name, scale.reshape(shape)
    if weight_form == "scaled":  # DequantizeLinear at scale 1 (exact integers), then Mul
        if qlayer.group_size is not None:
            raise ExportError(f"weight_form='scaled' takes per-tensor and per-channel grids, "
                              f"not groups of {qlayer.group_size}: use weight_form='qdq' with "
                              "the session options of adaround.export.exact_session_options()")
        broadcast = [1] * codes.ndim
        if axis is not None:
            broadcast[axis] = -1
        step = _initializer(proto, f"{name}_step", scale.reshape(broadcast if shape else ()))
        dq_out, dq_scale = f"{name}_integers", np.ones(shape, dtype=np.float32)
        nodes.append(helper.make_node("Mul", [dq_out, step], [name], name=f"{name}_Mul"))
    inputs = [
        _initializer(proto, f"{name}_quantized", codes.astype(np_type)),
        _initializer(proto, f"{name}_scale", dq_scale),
    ]
    if not qlayer.symmetric:
        inputs.append(_initializer(proto, f"{name}_zero_point",
                                   zero_point.reshape(shape).astype(np_type)))
    nodes.insert(0, helper.make_node("DequantizeLinear", inputs, [dq_out],
                                     name=f"{name}_DequantizeLinear", **attrs))
    kept = [init for init in proto.graph.initializer if init.name != name]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    for i, node in enumerate(nodes):
        proto.graph.node.insert(i, node)


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
