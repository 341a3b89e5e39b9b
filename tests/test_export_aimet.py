"""AIMET hand-over (`export_aimet`): state dict names, grids as AIMET's arithmetic reads them,
quantizer placement. aimet-torch itself is never imported here (it is no dependency): its
reading of min/max is re-done below in torch, and bench/aimet_consume.py checks the files in
a real aimet-torch (BENCHMARKS.md)."""

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
from adaround.export.aimet_grid import AIMET_MIN_SCALE, exact_range

onnx = pytest.importorskip("onnx", reason="install adaround[export] (onnx)")


def _quantize(model: nn.Module, data: torch.Tensor, **cfg: object) -> nn.Module:
    return adaround.quantize(model, data, QuantConfig(rounding="nearest", **cfg))


def _aimet_folded(model: nn.Module) -> nn.Module:
    """What aimet's fold_all_batch_norms leaves: BatchNorms -> Identity, folded convs with a
    bias (values do not matter: the state dict replaces them)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
        elif isinstance(module, nn.Conv2d) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_channels))
    return model


def _aimet_qdq(x: torch.Tensor, entries: list[dict], axis: int | None) -> torch.Tensor:
    """aimet-torch's set_legacy_encodings + quantize_dequantize, in float32: it keeps only
    bitwidth, is_symmetric, min and max, and derives scale and offset from them."""
    bits, symmetric = entries[0]["bitwidth"], entries[0]["is_symmetric"] == "True"
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    lo = torch.tensor([e["min"] for e in entries]).reshape(shape)
    hi = torch.tensor([e["max"] for e in entries]).reshape(shape)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(AIMET_MIN_SCALE)
    offset = torch.zeros_like(scale) if symmetric else torch.round(lo / scale) - qmin
    q = torch.clamp(torch.round(x / scale) - offset, qmin, qmax)
    return (q + offset) * scale


def test_exact_range_gives_aimet_the_scale_back() -> None:
    rng = np.random.default_rng(0)
    exact = total = 0
    for _ in range(400):
        s = float(np.float32(rng.uniform(0.5, 1.0) * 10.0 ** rng.integers(-4, 1)))
        for bits, offset in ((4, -8), (4, -int(rng.integers(0, 16))), (8, -128), (8, 0)):
            lo, hi, read = exact_range(s, offset, bits)
            back = (torch.tensor(hi) - torch.tensor(lo)) / (2**bits - 1)
            assert float(back) == read  # the scale it says AIMET reads is the one it reads
            total += 1
            exact += read == s
            assert abs(float(back) - s) <= 2 * np.spacing(np.float32(s))
            if offset != -(2 ** (bits - 1)):  # asymmetric: AIMET's offset is round(min / s)
                assert round(lo / float(back)) == offset
    assert exact / total > 0.95  # a few scales have no float32 pair: one ulp off


@pytest.mark.parametrize("cfg", [dict(weight_bits=4), dict(weight_bits=4, per_channel=True),
                                 dict(weight_bits=4, symmetric=False),
                                 dict(weight_bits=8, per_channel=True, symmetric=False)])
def test_state_dict_loads_into_the_folded_user_model_and_sits_on_aimets_grid(
        tmp_path: Path, cfg: dict) -> None:
    qmodel = _quantize(tiny_resnet(), images(32), **cfg)
    paths = adaround.export_aimet(qmodel, images(1), tmp_path)
    state = torch.load(paths["pth"])
    assert not any(".layer." in k or k.endswith((".codes", ".scale")) for k in state)
    user = _aimet_folded(tiny_resnet(seed=5))  # other float weights: all are replaced
    user.load_state_dict(state)  # strict
    x = images(8, seed=3)
    with torch.no_grad():  # equal but for the scales AIMET cannot read exactly (an ulp off)
        torch.testing.assert_close(user(x), qmodel(x), rtol=1e-6, atol=1e-6)
    encodings = json.loads(paths["torch_encodings"].read_text())
    assert encodings["activation_encodings"] == {}
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantLayer):
            weight = state[f"{name}.weight"]
            entries = encodings["param_encodings"][f"{name}.weight"]
            assert len(entries) == (1 if module.axis is None else weight.shape[module.axis])
            # AIMET's weight quantizer leaves the AdaRound weights exactly as they are
            assert torch.equal(_aimet_qdq(weight, entries, module.axis), weight)


def test_activation_encodings_are_keyed_by_module_and_quantize_as_ours(tmp_path: Path) -> None:
    qmodel = _quantize(tiny_resnet(), images(32), weight_bits=4)
    attach_act_quant(qmodel.stem, 8, True, 0.0173)
    attach_act_quant(qmodel.fc, 8, False, 0.0311)
    paths = adaround.export_aimet(qmodel, images(1), tmp_path)
    acts = json.loads(paths["torch_encodings"].read_text())["activation_encodings"]
    assert set(acts) == {"stem", "fc"} and set(acts["stem"]) == {"input"}
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    for name in ("stem", "fc"):
        ours = qmodel.get_submodule(name).act_quant(x)
        assert torch.equal(_aimet_qdq(x, acts[name]["input"]["0"], None), ours)
    config = json.loads(paths["config"].read_text())
    assert config["defaults"]["ops"] == {}  # no output quantizers
    assert config["op_type"]["Conv"] == {"is_input_quantized": "True"}
    assert config["op_type"]["Gemm"] == {"is_input_quantized": "True"}
    graph = json.loads(paths["encodings"].read_text())
    assert graph["version"] == "1.0.0" and len(graph["activation_encodings"]) == 2
    first = {e["name"]: e for e in graph["activation_encodings"]}
    inputs = {i.name for i in onnx.load(paths["onnx"]).graph.input}
    assert "input" in first and first["input"]["offset"] == [-128] and inputs == {"input"}


def test_weight_only_config_and_1_0_0_layout(tmp_path: Path) -> None:
    qmodel = _quantize(tiny_mixed(), sequences(32), weight_bits=4, symmetric=False,
                       per_channel=True)
    paths = adaround.export_aimet(qmodel, sequences(1), tmp_path, prefix="mixed")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["mixed.pth", "mixed.onnx", "mixed.encodings", "mixed_torch.encodings",
         "mixed_quantsim_config.json"])
    config = json.loads(paths["config"].read_text())
    assert config["op_type"] == {} and config["defaults"]["per_channel_quantization"] == "True"
    assert config["defaults"]["params"]["is_symmetric"] == "False"
    graph = json.loads(paths["encodings"].read_text())
    inits = {i.name for i in onnx.load(paths["onnx"]).graph.initializer}
    for entry in graph["param_encodings"]:
        assert entry["name"] in inits and entry["dtype"] == "INT" and entry["bw"] == 4
        assert entry["is_sym"] is False and entry["enc_type"] == "PER_CHANNEL"
        assert all(-15 <= o <= 0 for o in entry["offset"])
    old = adaround.export_aimet(qmodel, sequences(1), tmp_path / "v0", encoding_version="0.6.1")
    assert json.loads(old["encodings"].read_text())["version"] == "0.6.1"


def test_scales_below_aimets_minimum_are_raised_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_resnet()
    with torch.no_grad():
        model.stem.weight[0].mul_(1e-7)  # a nearly dead channel
    qmodel = _quantize(model, images(32), weight_bits=4, per_channel=True)
    assert float(qmodel.stem.scale.min()) < AIMET_MIN_SCALE
    with caplog.at_level("WARNING"):
        paths = adaround.export_aimet(qmodel, images(1), tmp_path)
    assert "below AIMET's minimum" in caplog.text
    entries = json.loads(paths["torch_encodings"].read_text())["param_encodings"]
    assert min(e["scale"] for e in entries["stem.weight"]) >= AIMET_MIN_SCALE
    weight = torch.load(paths["pth"])["stem.weight"]
    assert torch.equal(_aimet_qdq(weight, entries["stem.weight"], 0), weight)
    assert float(qmodel.stem.scale.min()) < AIMET_MIN_SCALE  # the caller's model is unchanged


def test_group_grids_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    qmodel = _quantize(tiny_resnet(), images(32))
    with pytest.raises(adaround.ExportError, match="1.0.0, 0.6.1"):
        adaround.export_aimet(qmodel, images(1), tmp_path, encoding_version="2.0.0")
    with pytest.raises(adaround.ExportError, match="plain file name"):
        adaround.export_aimet(qmodel, images(1), tmp_path, prefix="a/b")
    grouped = _quantize(tiny_mixed(), sequences(32), weight_bits=4, group_size=8,
                        include=("fc", "head"))
    with pytest.raises(adaround.ExportError, match="group"):
        adaround.export_aimet(grouped, sequences(1), tmp_path)


def test_cli_export_aimet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adaround.cli import main

    adaround.save(_quantize(tiny_resnet(), images(32)), tmp_path / "q.st")
    code = main(["-q", "export", "tiny_models:tiny_resnet", "--quantized",
                 str(tmp_path / "q.st"), "--format", "aimet", "--input-shape", "3,8,8",
                 "-o", str(tmp_path / "aimet"), "--prefix", "r"])
    assert code == 0 and (tmp_path / "aimet" / "r_torch.encodings").exists()
    assert "aimet config ->" in capsys.readouterr().out
    assert main(["-q", "export", "tiny_models:tiny_resnet", "--quantized",
                 str(tmp_path / "q.st"), "--format", "aimet", "-o", str(tmp_path / "x")]) == 2
