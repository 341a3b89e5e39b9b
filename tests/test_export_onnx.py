"""ONNX QDQ export: graph structure, agreement with onnxruntime, errors, atomic writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import attach_act_quant, images, sequences, tiny_mixed, tiny_resnet
from torch import Tensor, nn

import adaround
from adaround import QuantConfig
from adaround.export import build_onnx

onnx = pytest.importorskip("onnx", reason="install adaround[export] (onnx) to test ONNX export")
ort = pytest.importorskip("onnxruntime", reason="install adaround[export] (onnxruntime)")
TP = onnx.TensorProto
ATOL = 1e-5  # float32 convolutions of onnxruntime and PyTorch on O(1) logits
# Where a Conv/Gemm has both its input and its weight behind DequantizeLinear, onnxruntime
# rounds the float bias to int32 at scale s_input * s_weight, as integer backends do; the
# simulated model keeps it float. Without that transformer the outputs agree to float rounding.
EXACT = ["WeightBiasQuantization"]


def _quantize(model: nn.Module, data: Tensor, **cfg: object) -> nn.Module:
    return adaround.quantize(model, data, QuantConfig(rounding="nearest", **cfg))


def _run(proto: object, x: Tensor, level: object = None, exact: bool = False) -> np.ndarray:
    """onnxruntime's output; `exact` turns off its int32 rounding of biases (see below)."""
    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    session = ort.InferenceSession(proto.SerializeToString(),  # type: ignore[attr-defined]
                                   options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=EXACT if exact else [])
    return session.run(None, {"input": x.numpy()})[0]


def _torch(model: nn.Module, x: Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _dq_nodes(proto: object) -> dict[str, object]:
    return {n.output[0]: n for n in proto.graph.node  # type: ignore[attr-defined]
            if n.op_type == "DequantizeLinear"}


def _axis(node: object) -> int | None:
    found = [a.i for a in node.attribute if a.name == "axis"]  # type: ignore[attr-defined]
    return found[0] if found else None


@pytest.mark.parametrize("bits,signed,expected", [
    (4, True, TP.INT4), (4, False, TP.UINT4), (3, True, TP.INT4), (2, False, TP.UINT4),
    (8, True, TP.INT8), (6, False, TP.UINT8)])
def test_weight_initializers_are_integers_of_the_right_type(bits: int, signed: bool,
                                                            expected: int) -> None:
    qmodel = _quantize(tiny_resnet(), images(32), weight_bits=bits, symmetric=signed)
    proto = build_onnx(qmodel, images(2))
    inits = {i.name: i for i in proto.graph.initializer}
    dq = _dq_nodes(proto)
    for name in ("stem", "block.conv1", "block.conv2", "dw", "fc"):
        weight = f"{name}.weight"
        assert weight not in inits and weight in dq  # the float weight is gone
        codes = inits[dq[weight].input[0]]
        assert codes.data_type == expected
        n = qmodel.get_submodule(name).codes.numel()
        assert len(codes.raw_data) == (n + 1) // 2 if bits <= 4 else n
        assert _axis(dq[weight]) is None and list(inits[dq[weight].input[1]].dims) == []
        assert len(dq[weight].input) == (2 if signed else 3)
    assert proto.opset_import[0].version == 21


def test_per_channel_axes_follow_the_quant_layer() -> None:
    qmodel = _quantize(tiny_mixed(), sequences(32), per_channel=True, symmetric=False)
    proto = build_onnx(qmodel, sequences(2))
    inits = {i.name: i for i in proto.graph.initializer}
    dq = _dq_nodes(proto)
    for name, axis, channels in [("conv1d", 0, 6), ("up", 1, 4), ("fc", 0, 8), ("head", 0, 3)]:
        node = dq[f"{name}.weight"]
        assert _axis(node) == axis == qmodel.get_submodule(name).axis
        assert list(inits[node.input[1]].dims) == [channels]
        zero = inits[node.input[2]]
        assert zero.data_type == TP.UINT4 and list(zero.dims) == [channels]


def test_weight_bytes_at_most_bits_over_32_of_fp32_plus_scales() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    qmodel = _quantize(model.eval(), torch.randn(16, 8, 6, 6), per_channel=True)
    proto = build_onnx(qmodel, torch.randn(1, 8, 6, 6))
    fp32 = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("weight"))
    dq = _dq_nodes(proto)
    inits = {i.name: i for i in proto.graph.initializer}
    stored = sum(len(inits[i].raw_data) for node in dq.values() for i in node.input)
    scales = sum(len(inits[node.input[1]].raw_data) for node in dq.values())
    assert stored <= fp32 * 4 / 32 + scales


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 3, 8])
def test_onnxruntime_matches_the_simulated_model(per_channel: bool, symmetric: bool,
                                                 bits: int) -> None:
    for model, data in ((tiny_resnet(), images), (tiny_mixed(), sequences)):
        qmodel = _quantize(model, data(32), weight_bits=bits, per_channel=per_channel,
                           symmetric=symmetric)
        proto = build_onnx(qmodel, data(1))
        for batch in (1, 13):  # the batch dimension is dynamic
            x = data(batch, seed=7)
            got, want = _run(proto, x), _torch(qmodel, x)
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
            assert (got.argmax(1) == want.argmax(1)).all()


def test_adaround_result_and_float_graph_match_too() -> None:
    qmodel = adaround.quantize(tiny_resnet(), images(32), QuantConfig(iters=50, batch_size=16))
    x = images(8, seed=3)
    np.testing.assert_allclose(_run(build_onnx(qmodel, images(1)), x), _torch(qmodel, x),
                               atol=ATOL, rtol=0)
    float_graph = build_onnx(qmodel, images(1), qdq=False)
    assert not _dq_nodes(float_graph)
    assert all(i.data_type == TP.FLOAT for i in float_graph.graph.initializer)
    np.testing.assert_allclose(_run(float_graph, x), _torch(qmodel, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("bits,signed,qtype", [(8, False, TP.UINT8), (4, True, TP.INT8),
                                               (4, False, TP.UINT8), (3, True, TP.INT8),
                                               (6, False, TP.UINT8)])
def test_activation_quantizers_become_quantize_dequantize_pairs(bits: int, signed: bool,
                                                                qtype: int) -> None:
    qmodel = _quantize(tiny_resnet(), images(32), weight_bits=4, per_channel=True)
    for name in ("block.conv1", "block.conv2", "dw", "fc"):
        attach_act_quant(qmodel.get_submodule(name), bits, signed, scale=4.0 / 2**bits)
    attach_act_quant(qmodel.stem, 8, True, scale=0.03)
    qmodel.fc.act_quant.enabled = False  # a disabled quantizer is left out
    x = images(16, seed=11)
    proto = build_onnx(qmodel, images(1))
    quantize_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_nodes) == 4
    inits = {i.name: i for i in proto.graph.initializer}
    assert inits["block.conv1.input_zero_point"].data_type == qtype
    assert inits["stem.input_zero_point"].data_type == TP.INT8
    clips = [n for n in proto.graph.node if n.name.endswith(".input_Clip")]  # not ReLU6's
    assert len(clips) == (0 if bits == 8 else 3)
    conv1 = next(n for n in proto.graph.node if "block.conv1.weight" in n.input)
    assert conv1.input[0] == "block.conv1.input_dq"
    want = _torch(qmodel, x)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):  # fusions keep the results
        np.testing.assert_allclose(_run(proto, x, level, exact=True), want, atol=ATOL, rtol=0)
    got = _run(proto, x)  # the default session: biases rounded to int32
    np.testing.assert_allclose(got, want, atol=1e-2, rtol=0)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_clear_errors_for_models_that_cannot_be_exported() -> None:
    with pytest.raises(adaround.ExportError, match="no QuantLayer"):
        build_onnx(tiny_resnet(), images(1))
    qmodel = _quantize(tiny_resnet(), images(32))
    qmodel.stem.mode = "float"
    with pytest.raises(adaround.ExportError, match="not quantized yet"):
        build_onnx(qmodel, images(1))
    qmodel.stem.mode = "quantized"
    with pytest.raises(adaround.ExportError, match="example_input"):
        build_onnx(qmodel, "not a tensor")  # type: ignore[arg-type]
    with pytest.raises(adaround.ExportError, match="shaped as the model expects"):
        build_onnx(qmodel, torch.randn(1, 5, 8, 8))


def test_export_onnx_writes_a_file_onnxruntime_loads(tmp_path: Path) -> None:
    qmodel = _quantize(tiny_resnet(), images(32))
    path = adaround.export_onnx(qmodel, images(1), tmp_path / "sub" / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(3, seed=5)
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], _torch(qmodel, x),
                               atol=ATOL, rtol=0)
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temporary left


# -- atomic writes: an export killed in the middle of writing leaves the target alone ----------

_SLOW_EXPORT = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    sys.path.insert(0, {tests!r})
    import torch, adaround, onnx, safetensors.torch
    from tiny_models import images, tiny_resnet
    fmt, target, ready = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def slow_write(path):
        with open(path, "wb") as fh:
            fh.write(b"half of a file")
            fh.flush()
            open(ready, "w").close()
            time.sleep(60)

    onnx.save_model = lambda proto, path, *a, **k: slow_write(path)
    safetensors.torch.save_file = lambda tensors, path, *a, **k: slow_write(path)
    if fmt == "encodings":
        Path.write_text = lambda self, *a, **k: slow_write(self)
    qmodel = adaround.quantize(tiny_resnet(), images(32), adaround.QuantConfig(rounding="nearest"))
    if fmt == "onnx":
        adaround.export_onnx(qmodel, images(1), target)
    elif fmt == "packed":
        adaround.save(qmodel, target)
    else:
        adaround.export_encodings(qmodel, target)
""")


@pytest.mark.parametrize("fmt", ["onnx", "packed", "encodings"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_export_leaves_the_old_file_unchanged(tmp_path: Path, fmt: str,
                                                     sig: signal.Signals) -> None:
    target, ready = tmp_path / "out.file", tmp_path / "ready"
    target.write_bytes(b"the previous export")
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_EXPORT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), fmt, str(target), str(ready)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the export never started writing"
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert target.read_bytes() == b"the previous export"
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    if sig == signal.SIGINT:  # an interrupt runs the clean-up: no temporary file remains
        assert leftovers == ["out.file", "ready", "slow.py"]


# -- command line -------------------------------------------------------------------------------

def test_cli_exports_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adaround.cli import main

    qmodel = _quantize(tiny_resnet(), images(32))
    adaround.save(qmodel, tmp_path / "q.st")
    model = ["tiny_models:tiny_resnet", "--quantized", str(tmp_path / "q.st")]
    assert main(["-q", "export", *model, "--format", "onnx", "--input-shape", "3,8,8",
                 "-o", str(tmp_path / "m.onnx")]) == 0
    x = images(4, seed=2)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], _torch(qmodel, x),
                               atol=ATOL, rtol=0)
    assert main(["-q", "export", *model, "--format", "packed", "-o",
                 str(tmp_path / "p.st")]) == 0
    assert (tmp_path / "p.st").read_bytes() == (tmp_path / "q.st").read_bytes()
    assert main(["-q", "export", *model, "--format", "encodings", "--input-shape", "3,8,8",
                 "--float-onnx", str(tmp_path / "f.onnx"), "-o", str(tmp_path / "e.json")]) == 0
    assert (tmp_path / "f.onnx").exists() and "stem.weight" in (tmp_path / "e.json").read_text()
    assert "encodings ->" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--format", "onnx"], "needs --input-shape"),
    (["--format", "onnx", "--input-shape", "3,x"], "not a comma-separated list of integers"),
    (["--format", "onnx", "--input-shape", "5,8,8"], "shaped as the model expects"),
])
def test_cli_export_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      extra: list[str], message: str) -> None:
    from adaround.cli import main

    adaround.save(_quantize(tiny_resnet(), images(32)), tmp_path / "q.st")
    code = main(["-q", "export", "tiny_models:tiny_resnet", "--quantized", str(tmp_path / "q.st"),
                 "-o", str(tmp_path / "m.onnx"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
