"""The float ONNX graph of a quantized model, and where each QuantLayer's weight sits in it.

Every exporter starts from the same graph: the model with each QuantLayer replaced by its float
layer holding the *dequantized* weight ((codes - zero_point) * scale), exported by PyTorch's
TorchScript-based exporter (`dynamo=False`: no onnxscript needed). Each weight is then found
among the graph's initializers by name (`<layer>.weight`) or, where the exporter renamed or
transposed it, by its exact values.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adaround.errors import ExportError
from adaround.nn.quant_layer import QuantLayer

log = logging.getLogger(__name__)

TORCH_OPSET = 20  # the TorchScript exporter's newest opset; the graph is then marked 21
ONNX_OPSET = 21  # INT4/UINT4 DequantizeLinear and QuantizeLinear
IR_VERSION = 10  # opset 21 and the INT4/UINT4 types need IR version 10
_PIP = "pip install 'adaround[export]'"


def require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the onnx package: {_PIP}") from exc
    return onnx


@dataclass
class WeightSite:
    """Where a QuantLayer's weight is in the graph: an initializer, maybe transposed (2-D)."""

    layer: str
    qlayer: QuantLayer
    initializer: str
    transposed: bool


def quant_layers(qmodel: nn.Module) -> list[tuple[str, QuantLayer]]:
    """The model's QuantLayers; refuses a model that has none or one not yet quantized."""
    found = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    if not found:
        raise ExportError("the model has no QuantLayer: pass the result of adaround.quantize "
                          "or adaround.load")
    pending = [n or "<model>" for n, m in found if m.mode != "quantized"]
    if pending:
        raise ExportError(f"layers {pending[:5]} are not quantized yet (mode float): export "
                          "the result of adaround.quantize or adaround.load")
    return found


def float_twin(qmodel: nn.Module) -> nn.Module:
    """A copy of `qmodel` whose QuantLayers are plain float layers with the dequantized weight.

    Activation quantizers live on the QuantLayers and go with them: the twin computes in float.
    """
    twin = copy.deepcopy(qmodel).eval()
    if isinstance(twin, QuantLayer):
        return _dequantized_layer(twin)
    for name, qlayer in quant_layers(twin):
        parent_name, _, leaf = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else twin
        setattr(parent, leaf, _dequantized_layer(qlayer))
    return twin


def _dequantized_layer(qlayer: QuantLayer) -> nn.Module:
    layer = qlayer.layer
    with torch.no_grad():
        layer.weight = nn.Parameter(qlayer.quantized_weight().detach().clone(),
                                    requires_grad=False)
    return layer


ExampleInput = Tensor | tuple[Tensor, ...] | dict[str, Tensor]


def as_inputs(example_input: ExampleInput) -> tuple[Tensor, ...]:
    if isinstance(example_input, dict):
        example_input = tuple(example_input.values())
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise ExportError("example_input must be a tensor, a tuple of tensors or a dict of "
                          "named tensors (e.g. a tokenizer's output) shaped like the model's "
                          "inputs (e.g. torch.randn(1, 3, 32, 32))")
    return inputs


def _names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


class _KeywordCall(nn.Module):
    """Calls `model(**{name: tensor})` from positional tensors and returns its tensor outputs
    as a flat tuple (a Hugging Face ModelOutput's fields in order; caches and Nones left out):
    the exporter traces positional tensors only."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names
        self.output_names: list[str] = []

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        out = self.model(**dict(zip(self.names, tensors)))
        if isinstance(out, Tensor):
            self.output_names = ["output"]
            return (out,)
        if hasattr(out, "items"):  # ModelOutput / dict
            pairs = [(k, v) for k, v in out.items() if isinstance(v, Tensor)]
        else:
            pairs = [(f"output_{i}", v) for i, v in enumerate(out) if isinstance(v, Tensor)]
        self.output_names = [k for k, _ in pairs]
        return tuple(v for _, v in pairs)


def _keyword_axes(inputs: dict[str, Tensor], outputs: tuple[Tensor, ...], names: list[str]
                  ) -> dict[str, dict[int, str]]:
    """Dynamic batch (dim 0) and sequence (dim 1 of 2-D inputs, and of outputs of 3 or more
    dimensions whose dim 1 is the sequence length) axes."""
    axes: dict[str, dict[int, str]] = {}
    length = next((t.shape[1] for t in inputs.values() if t.dim() >= 2), None)
    for name, t in inputs.items():
        axes[name] = {0: "batch", 1: "sequence"} if t.dim() >= 2 else {0: "batch"}
    for name, t in zip(names, outputs):
        seq = t.dim() >= 3 and length is not None and t.shape[1] == length
        axes[name] = {0: "batch", 1: "sequence"} if seq else {0: "batch"}
    return axes


def export_float_graph(model: nn.Module, example_input: ExampleInput,
                       dynamic_batch: bool = True) -> Any:
    """ONNX ModelProto of `model` (float). Inputs "input"/"input_i", outputs "output"/...;
    a dict `example_input` (a tokenizer's output) gives named inputs and outputs (the fields of
    a Hugging Face ModelOutput), with dynamic batch and sequence axes."""
    onnx = require_onnx()
    inputs = as_inputs(example_input)
    buffer = io.BytesIO()
    try:
        if isinstance(example_input, dict):
            in_names = list(example_input)
            model = _KeywordCall(model, in_names)
        with torch.no_grad():
            out = model(*inputs)
        if isinstance(example_input, dict):
            out_names = model.output_names
            axes = _keyword_axes(example_input, out, out_names) if dynamic_batch else None
        else:
            n_out = len(out) if isinstance(out, (tuple, list)) else 1
            in_names, out_names = _names("input", len(inputs)), _names("output", n_out)
            axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=TORCH_OPSET,
                              input_names=in_names, output_names=out_names, dynamic_axes=axes,
                              do_constant_folding=True)
    except Exception as exc:
        fix = "check that example_input is shaped as the model expects"
        if "scaled_dot_product_attention" in str(exc):  # torch.onnx's TorchScript exporter
            fix = ("build the model with attn_implementation=\"eager\" (the exporter has no "
                   "grouped-query scaled_dot_product_attention), quantize and export again")
        raise ExportError(f"exporting the model failed ({type(exc).__name__}: {exc}); "
                          f"{fix}") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = ONNX_OPSET  # ops used by the exporter are unchanged from 20 to 21
    proto.ir_version = IR_VERSION  # the exporter writes 9, which strict consumers refuse
    return proto


def _fingerprint(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest() + str(array.shape)


def executed_layers(qmodel: nn.Module, example_input: Any) -> set[str]:
    """The QuantLayers that the forward pass runs on `example_input` (an auxiliary head that
    only runs in training mode does not, and has no place in the exported graph)."""
    seen: set[str] = set()
    handles = [m.register_forward_hook(lambda *_, n=n: seen.add(n))
               for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    try:
        with torch.no_grad():
            if isinstance(example_input, dict):  # Hugging Face models: keyword inputs
                qmodel(**example_input)
            else:
                qmodel(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def locate_weights(proto: Any, qmodel: nn.Module,
                   executed: set[str] | None = None) -> list[WeightSite]:
    """Find each QuantLayer's dequantized weight among `proto`'s initializers (of the layers
    in `executed`, where given: the others are not part of the exported computation)."""
    from onnx import numpy_helper

    arrays = {init.name: init for init in proto.graph.initializer}
    by_value: dict[str, str] = {}
    for init in proto.graph.initializer:
        if init.data_type == 1:  # FLOAT
            by_value.setdefault(_fingerprint(numpy_helper.to_array(init)), init.name)
    layers = [("", qmodel)] if isinstance(qmodel, QuantLayer) else quant_layers(qmodel)
    sites = []
    for name, qlayer in layers:
        if executed is not None and name not in executed:
            log.info("layer %s does not run on the example input (e.g. an auxiliary head in "
                     "eval mode): it is not in the exported graph", name)
            continue
        weight = qlayer.quantized_weight().detach().cpu().float().numpy()
        wname = f"{name}.weight" if name else "weight"
        if wname in arrays and np.array_equal(numpy_helper.to_array(arrays[wname]), weight):
            sites.append(WeightSite(name, qlayer, wname, transposed=False))
        elif _fingerprint(weight) in by_value:
            sites.append(WeightSite(name, qlayer, by_value[_fingerprint(weight)], False))
        elif weight.ndim == 2 and _fingerprint(weight.T) in by_value:
            sites.append(WeightSite(name, qlayer, by_value[_fingerprint(weight.T)], True))
        else:
            raise ExportError(
                f"the weight of layer {name or '<model>'} is not an initializer of the exported "
                "graph (its forward transforms the weight before using it): exclude the layer "
                "from quantization (QuantConfig(exclude=...)) to export this model"
            )
    return sites


def consumers(proto: Any, tensor: str) -> list[Any]:
    return [node for node in proto.graph.node if tensor in node.input]


def data_input(proto: Any, node: Any, weight: str) -> int:
    """Index of the activation input of the node that consumes `weight` (Conv/Gemm/MatMul)."""
    constants = {init.name for init in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    for i, name in enumerate(node.input):
        if name and name != weight and name not in constants:
            return i
    raise ExportError(f"node {node.name} ({node.op_type}) that uses {weight} has no activation "
                      "input to quantize")
