import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import SamePadConv, images, sequences, tiny_mixed, tiny_resnet
from torch import nn

import adaround
from adaround import QuantConfig, QuantLayer

FAST = dict(iters=300, batch_size=16)


def _mse(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(x) - b(x)).pow(2).mean().item()


def _codes(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.codes.clone() for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}


def test_toy_layer_adaround_beats_nearest_on_reconstruction_error() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    # correlated inputs: with white inputs E[(dW x)^2] = ||dW||^2 and nearest is optimal
    x = torch.randn(512, 16) @ torch.randn(16, 16)
    cfg = QuantConfig(weight_bits=3, iters=1000)
    ada = adaround.quantize(layer, x, cfg)
    near = adaround.quantize(layer, x, QuantConfig(weight_bits=3, rounding="nearest"))
    assert _mse(ada, layer, x) < 0.8 * _mse(near, layer, x)
    (result,) = ada.adaround_report
    assert result.loss_adaround < result.loss_nearest and result.flipped > 0


def test_end_to_end_residual_net_improves_on_nearest_and_leaves_model_unchanged() -> None:
    model = tiny_resnet()
    original = copy.deepcopy(model.state_dict())
    x = images(256)
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=3, **FAST))
    nearest = adaround.quantize(model, x, QuantConfig(weight_bits=3, rounding="nearest"))
    test = images(256, seed=7)
    assert _mse(qmodel, model, test) < _mse(nearest, model, test)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key])
    assert all(isinstance(m, nn.BatchNorm2d) for m in [model.bn, model.block.bn1])
    assert [r.name for r in qmodel.adaround_report] == ["stem", "block.conv1", "block.conv2",
                                                        "dw", "fc"]


def test_quantized_layers_compute_with_integer_codes_times_scale() -> None:
    model = tiny_resnet()
    qmodel = adaround.quantize(model, images(64), QuantConfig(weight_bits=4, per_channel=True,
                                                              **FAST))
    stem = qmodel.stem
    assert stem.mode == "quantized" and stem.codes.dtype == torch.int8
    assert stem.codes.min() >= -8 and stem.codes.max() <= 7
    assert stem.scale.shape == (8, 1, 1, 1)
    x = images(4)
    expected = nn.functional.conv2d(x, stem.codes.float() * stem.scale, stem.layer.bias,
                                    padding=1)
    torch.testing.assert_close(stem(x), expected)
    # floor or ceil of W / s for every weight
    ratio = stem.layer.weight / stem.scale
    assert ((stem.codes == ratio.floor()) | (stem.codes == ratio.ceil())).all()


def test_nearest_rounding_is_round_to_nearest_on_the_same_grid() -> None:
    model = tiny_resnet()
    qmodel = adaround.quantize(model, images(8), QuantConfig(rounding="nearest"))
    fc = qmodel.fc
    expected = torch.clamp(torch.round(fc.layer.weight / fc.scale), -8, 7)
    assert torch.equal(fc.codes.float(), expected)


def test_same_seed_same_rounding() -> None:
    model, x = tiny_resnet(), images(64)
    a = _codes(adaround.quantize(model, x, QuantConfig(seed=3, **FAST)))
    b = _codes(adaround.quantize(model, x, QuantConfig(seed=3, **FAST)))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_layer_types_asymmetric_per_channel_and_dataloader_input() -> None:
    model = tiny_mixed()
    data = torch.utils.data.TensorDataset(sequences(96), torch.zeros(96, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    cfg = QuantConfig(weight_bits=4, symmetric=False, per_channel=True, iters=1000,
                      batch_size=16)
    qmodel = adaround.quantize(model, loader, cfg)
    assert qmodel.up.axis == 1 and qmodel.up.codes.dtype == torch.uint8
    nearest = adaround.quantize(model, loader, QuantConfig(weight_bits=4, symmetric=False,
                                                           per_channel=True, rounding="nearest"))
    x = sequences(128, seed=5)
    assert _mse(qmodel, model, x) < _mse(nearest, model, x)


def test_save_and_load_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_resnet()
    qmodel = adaround.quantize(model, images(64), QuantConfig(weight_bits=3, **FAST))
    path = tmp_path / "q.pt"
    adaround.save(qmodel, path)
    loaded = adaround.load(path, tiny_resnet())
    x = images(16, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert loaded.adaround_meta["config"]["weight_bits"] == 3
    # the file holds packed codes, not float weights
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
    assert "stem.codes" in keys and "stem.layer.weight" not in keys


def test_load_refuses_other_architecture_newer_format_and_garbage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    qmodel = adaround.quantize(tiny_resnet(), images(8), QuantConfig(rounding="nearest"))
    path = tmp_path / "q.pt"
    adaround.save(qmodel, path)
    with pytest.raises(adaround.SaveFileError, match="architecture"):
        adaround.load(path, tiny_mixed())
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        header = json.loads(fh.metadata()["adaround"])
    header["format_version"] = 99
    save_file(tensors, str(tmp_path / "new.pt"), metadata={"adaround": json.dumps(header)})
    with pytest.raises(adaround.SaveFileError, match="upgrade adaround"):
        adaround.load(tmp_path / "new.pt", tiny_resnet())
    (tmp_path / "bad.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(adaround.SaveFileError, match="not a readable"):
        adaround.load(tmp_path / "bad.pt", tiny_resnet())


def test_conv_subclass_with_its_own_forward_keeps_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(SamePadConv(), nn.ReLU())
    x = images(64)
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=8, iters=50, batch_size=16))
    with torch.no_grad():
        assert qmodel(x).shape == model(x).shape == (64, 4, 4, 4)
        torch.testing.assert_close(qmodel(x), model(x), atol=0.02, rtol=0.0)


def test_short_runs_are_warned_with_the_lr_that_fits(caplog) -> None:  # type: ignore[no-untyped-def]
    from adaround.config import short_run_note

    assert short_run_note(QuantConfig()) is None  # the paper's 10k iterations at lr 1e-3
    assert short_run_note(QuantConfig(iters=300, rounding="nearest")) is None
    assert "set lr to about 0.01 (3 / iters)" in (short_run_note(QuantConfig(iters=300)) or "")
    assert short_run_note(QuantConfig(iters=300, lr=0.01)) is None
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(256, 32)
    with caplog.at_level("WARNING", logger="adaround"):
        slow = adaround.quantize(net, x, QuantConfig(weight_bits=3, iters=100, loss="sampled"))
    assert "3 / iters" in caplog.text
    fast = adaround.quantize(net, x, QuantConfig(weight_bits=3, iters=100, lr=0.03,
                                                 loss="sampled"))
    # lr * iters = 0.1 flips only near-ties; 3 flips what the loss asks for
    assert _mse(fast, net, x) < 0.9 * _mse(slow, net, x)
