"""Encodings JSON (AIMET 0.6.1 layout): values round-trip, names match the float ONNX graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import attach_act_quant, images, sequences, tiny_mixed, tiny_resnet
from torch import nn

import adaround
from adaround import QuantConfig, QuantLayer
from adaround.export import build_onnx, read_encodings
from adaround.export.encodings import encodings_dict

pytest.importorskip("onnx", reason="install adaround[export] (onnx) to name ONNX tensors")


def _layers(qmodel: nn.Module) -> dict[str, QuantLayer]:
    return {f"{n}.weight": m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}


@pytest.mark.parametrize("make,data,cfg", [
    (tiny_resnet, images, dict(weight_bits=4)),
    (tiny_resnet, images, dict(weight_bits=8, per_channel=True)),
    (tiny_mixed, sequences, dict(weight_bits=4, symmetric=False, per_channel=True)),
    (tiny_mixed, sequences, dict(weight_bits=5, symmetric=False)),
])
def test_param_encodings_round_trip_to_the_same_grid_and_codes(tmp_path: Path, make, data,
                                                               cfg) -> None:  # type: ignore[no-untyped-def]
    qmodel = adaround.quantize(make(), data(32), QuantConfig(rounding="nearest", **cfg))
    path = adaround.export_encodings(qmodel, tmp_path / "model.encodings", data(1))
    grids = read_encodings(path)
    layers = _layers(qmodel)
    assert set(grids) == set(layers)
    for name, qlayer in layers.items():
        grid = grids[name]
        assert grid["kind"] == "param" and grid["bits"] == qlayer.bits
        assert grid["signed"] == qlayer.symmetric
        np.testing.assert_array_equal(grid["scale"], qlayer.scale.reshape(-1).numpy())
        np.testing.assert_array_equal(grid["zero_point"], qlayer.zero_point.reshape(-1).numpy())
        # the dequantized weight, quantized again with the file's grid, gives the same codes
        shape = [1] * qlayer.codes.dim()
        if qlayer.axis is not None:
            shape[qlayer.axis] = -1
        scale = torch.from_numpy(grid["scale"]).reshape(shape)
        zero = torch.from_numpy(grid["zero_point"]).reshape(shape)
        codes = torch.round(qlayer.quantized_weight().detach() / scale) + zero
        assert torch.equal(codes, qlayer.codes.to(codes.dtype))


def test_file_layout_and_the_offset_min_max_convention(tmp_path: Path) -> None:
    qmodel = adaround.quantize(tiny_mixed(), sequences(32),
                               QuantConfig(rounding="nearest", weight_bits=4, symmetric=False,
                                           per_channel=True))
    data = json.loads(adaround.export_encodings(qmodel, tmp_path / "e.json",
                                                sequences(1)).read_text())
    assert data["version"] == "0.6.1" and data["activation_encodings"] == {}
    assert data["quantizer_args"]["param_bitwidth"] == 4
    assert data["quantizer_args"]["per_channel_quantization"] == "True"
    up = data["param_encodings"]["up.weight"]
    assert len(up) == 4  # ConvTranspose2d(6, 4): one encoding per output channel (axis 1)
    for channel, entry in enumerate(up):
        assert set(entry) == {"bitwidth", "dtype", "is_symmetric", "max", "min", "offset",
                              "scale"}
        assert entry["bitwidth"] == 4 and entry["dtype"] == "int"
        assert entry["is_symmetric"] == "False" and isinstance(entry["offset"], int)
        assert entry["offset"] == -int(qmodel.up.zero_point.reshape(-1)[channel])
        assert entry["min"] == pytest.approx(entry["offset"] * entry["scale"])
        assert entry["max"] == pytest.approx((15 + entry["offset"]) * entry["scale"])
    stem = encodings_dict(adaround.quantize(tiny_resnet(), images(16),
                                            QuantConfig(rounding="nearest", weight_bits=3)))
    entry = stem["param_encodings"]["stem.weight"][0]  # symmetric: q = c + 4, offset -4
    assert entry["offset"] == -4 and entry["is_symmetric"] == "True"


def test_names_are_tensors_of_the_float_onnx_graph_and_activations_round_trip() -> None:
    qmodel = adaround.quantize(tiny_resnet(), images(32),
                               QuantConfig(rounding="nearest", per_channel=True))
    attach_act_quant(qmodel.block.conv2, 8, False, scale=0.05)
    attach_act_quant(qmodel.fc, 4, True, scale=0.2)
    data = encodings_dict(qmodel, images(1))
    graph = build_onnx(qmodel, images(1), qdq=False).graph
    initializers = {i.name for i in graph.initializer}
    assert set(data["param_encodings"]) <= initializers
    conv2 = next(n for n in graph.node if "block.conv2.weight" in n.input)
    fc = next(n for n in graph.node if "fc.weight" in n.input)
    assert set(data["activation_encodings"]) == {conv2.input[0], fc.input[0]}
    unsigned = data["activation_encodings"][conv2.input[0]][0]
    assert unsigned["offset"] == 0 and unsigned["is_symmetric"] == "False"
    assert unsigned["bitwidth"] == 8 and unsigned["max"] == pytest.approx(255 * 0.05)
    grids = read_encodings(data)
    signed = grids[fc.input[0]]
    assert signed["kind"] == "activation" and signed["signed"] and signed["bits"] == 4
    assert signed["scale"][0] == np.float32(0.2) and signed["zero_point"][0] == 0
    assert data["quantizer_args"]["activation_bitwidth"] == 32  # 8 and 4 bits: no one width


def test_activation_encodings_need_the_example_input() -> None:
    qmodel = adaround.quantize(tiny_resnet(), images(32), QuantConfig(rounding="nearest"))
    assert set(encodings_dict(qmodel)["param_encodings"]) == set(_layers(qmodel))
    attach_act_quant(qmodel.fc, 8, False, scale=0.1)
    with pytest.raises(adaround.ExportError, match="pass example_input"):
        encodings_dict(qmodel)
