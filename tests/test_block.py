import copy

import pytest
import torch
from tiny_models import (
    TinyBottleneckNet,
    TinyMobileNet,
    TinyTransformer,
    images,
    randomize_bn,
    tiny_mixed,
    tiny_resnet,
    tokens,
)
from torch import nn

import adaround
from adaround import ModelError, QuantConfig
from adaround.blocks import Unit, discover_blocks, named_blocks, plan_units
from adaround.nn.act_quant import ActQuant
from adaround.prepare import plan_layers, swap_in_quant_layers
from adaround.reconstruct.block import BlockResult, reconstruct_unit
from adaround.reconstruct.block_data import UnitInputs, fisher_weights
from adaround.reconstruct.loop import adaround_layer
from adaround.trace import trace_model

FAST = dict(iters=200, batch_size=16)


def _mse(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(x) - b(x)).pow(2).mean().item()


@pytest.mark.parametrize("make, x, expected", [
    (tiny_resnet, images(2), ["block"]),
    (lambda: TinyBottleneckNet().eval(), images(2), ["layer1.0", "layer1.1", "layer1.2"]),
    # the middle block has no skip (stride 2): found as a sibling of the same class
    (lambda: TinyMobileNet().eval(), images(2), ["features.0", "features.1", "features.2"]),
    (lambda: TinyTransformer().eval(), tokens(2), ["layers.0", "layers.1"]),
    # BERT-style layers add their residuals inside submodules: found as attention + MLP
    (lambda: TinyTransformer(post_norm=True).eval(), tokens(2), ["layers.0", "layers.1"]),
    (tiny_mixed, torch.randn(2, 2, 16), []),
])
def test_blocks_are_found_on_the_test_models(make, x, expected) -> None:  # type: ignore[no-untyped-def]
    assert discover_blocks(make(), x) == expected


def test_cifar_resnet_and_efficientnet_blocks() -> None:
    from adaround.models.cifar_resnet import resnet20

    assert discover_blocks(resnet20(), torch.randn(2, 3, 32, 32)) == [
        f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    effnet = pytest.importorskip("efficientnet_lite_pytorch")
    model = effnet.EfficientNet.from_name("efficientnet-lite0").eval()
    found = discover_blocks(model, torch.randn(2, 3, 224, 224))
    assert sorted(found) == sorted(f"_blocks.{i}" for i in range(16))


def test_named_blocks_take_the_outermost_match_and_refuse_no_match() -> None:
    model = TinyBottleneckNet()
    assert named_blocks(model, ("layer1.*",)) == ["layer1.0", "layer1.1", "layer1.2"]
    assert named_blocks(model, ("layer1",)) == ["layer1"]
    with pytest.raises(ModelError, match="match no module"):
        named_blocks(model, ("nope.*",))


def test_units_follow_execution_order_with_layers_outside_blocks_alone() -> None:
    order = ["stem", "b.conv1", "b.conv2", "dw", "fc"]
    units = plan_units(["b"], order, set(order) - {"dw"})
    assert units == [Unit("stem", ("stem",), "layer"), Unit("b", ("b.conv1", "b.conv2"), "block"),
                     Unit("fc", ("fc",), "layer")]


def _toy_layer() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(256, 16) @ torch.randn(16, 16)
    cfg = QuantConfig(weight_bits=3, loss="sampled")
    plans = plan_layers(fp, trace_model(fp, x[:2]), cfg)
    return fp, swap_in_quant_layers(copy.deepcopy(fp), plans, cfg), x


def test_a_layer_alone_in_the_unit_loop_gets_the_codes_of_the_paper_loop() -> None:
    fp, qmodel, x = _toy_layer()
    twin = copy.deepcopy(qmodel)
    cfg = QuantConfig(weight_bits=3, iters=400, batch_size=16, loss="sampled")
    with torch.no_grad():
        target = torch.relu(fp[0](x))
    adaround_layer("0", qmodel[0], x, target, torch.relu, cfg, torch.Generator().manual_seed(3))
    inputs = UnitInputs.from_calls([((x,), {})])
    result = reconstruct_unit(Unit("0", ("0",), "layer"), twin, inputs, target, torch.relu,
                              None, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(twin[0].codes, qmodel[0].codes)
    assert result.loss_adaround < result.loss_nearest and result.iters == 400
    assert 0 < result.step_seconds < result.seconds  # steps, then data and losses around them


@pytest.mark.parametrize("method", ["brecq", "qdrop"])
def test_end_to_end_w4a4_block_reconstruction_beats_nearest(method) -> None:  # type: ignore[no-untyped-def]
    model, x, test = tiny_resnet(), images(256), images(256, seed=7)
    common = dict(weight_bits=4, act_bits=4, act_range="mse", **FAST)
    nearest = adaround.quantize(model, x, QuantConfig(rounding="nearest", **common))
    qmodel = adaround.quantize(model, x, QuantConfig(method=method, **common))
    assert _mse(qmodel, model, test) < 0.8 * _mse(nearest, model, test)
    report = qmodel.adaround_report
    assert all(isinstance(r, BlockResult) for r in report)
    assert [(r.name, r.kind) for r in report] == [
        ("stem", "layer"), ("block", "block"), ("dw", "layer"), ("fc", "layer")]
    assert report[1].layers == ("block.conv1", "block.conv2")
    assert set(report[1].act_ranges) == {"block.conv1", "block.conv2"}
    assert all(r.loss_adaround <= 1.01 * r.loss_nearest for r in report)
    assert report[1].loss_adaround < 0.97 * report[1].loss_nearest
    learned = [a for r in report for a in r.act_ranges.values()]
    assert any(a.scale_end != a.scale_start for a in learned)  # LSQ moved the steps
    for m in qmodel.modules():
        if isinstance(m, ActQuant):
            assert m.qdrop is None and not m.scale.requires_grad


def test_qdrop_with_layer_units_and_fixed_steps_runs_the_unit_loop() -> None:
    model, x = tiny_resnet(), images(128)
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=4, act_bits=4, qdrop=0.5,
                                                     **FAST))
    report = qmodel.adaround_report
    assert [r.kind for r in report] == ["layer"] * 5
    assert all(a.scale_end == a.scale_start for r in report for a in r.act_ranges.values())


def test_fisher_weights_have_mean_one_the_output_shape_and_a_floor() -> None:
    model, x = tiny_resnet(), images(64)
    weights = fisher_weights(model, "block", list(x.split(32)))
    with torch.no_grad():
        out = model.block(torch.relu(model.bn(model.stem(x))))
    assert weights.shape == out.shape and weights.mean().item() == pytest.approx(1.0, rel=1e-4)
    # damped: elements the loss barely moves still count (undamped g^2 goes down to ~1e-9)
    assert weights.min().item() > 0.1 and weights.max().item() > 10 * weights.min().item()
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=4, method="brecq", fisher=True,
                                                     **FAST))
    assert [r.kind for r in qmodel.adaround_report].count("block") == 1


def test_named_blocks_on_a_transformer_with_a_layer_called_twice() -> None:
    torch.manual_seed(0)
    model = TinyTransformer(post_norm=True).eval()
    x = tokens(128)
    cfg = QuantConfig(weight_bits=4, act_bits=8, unit="block", blocks=("layers.*",), **FAST)
    qmodel = adaround.quantize(model, x, cfg)
    report = qmodel.adaround_report
    assert [r.name for r in report] == ["embed", "layers.0", "layers.1", "head"]
    assert "layers.0.up" not in report[1].layers  # called twice per forward: nearest
    assert qmodel.layers[0].up.mode == "quantized"
    nearest = adaround.quantize(model, x, QuantConfig(weight_bits=4, act_bits=8,
                                                      rounding="nearest"))
    assert _mse(qmodel, model, tokens(64, seed=3)) < _mse(nearest, model, tokens(64, seed=3))


def test_mobilenet_blocks_reconstruct_with_qdrop() -> None:
    torch.manual_seed(0)
    model = randomize_bn(TinyMobileNet())
    qmodel = adaround.quantize(model, images(128), QuantConfig(
        weight_bits=4, act_bits=4, method="qdrop", first_last_bits=8, input_act_bits=8,
        last_act_bits=8, **FAST))
    kinds = [(r.name, r.kind) for r in qmodel.adaround_report]
    assert kinds == [("stem", "layer"), ("features.0", "block"), ("features.1", "block"),
                     ("features.2", "block"), ("head", "layer")]
    assert qmodel.stem.act_quant.bits == 8 and qmodel.head.act_quant.bits == 8
    assert qmodel.features[0].conv[3].act_quant.bits == 4
