import pytest
import torch
from tiny_models import images, tiny_resnet
from torch import nn

import adaround
from adaround import QuantConfig, QuantLayer
from adaround.act_calibration import act_bits_of, calibrate_activations, choose_scale
from adaround.nn.act_quant import (
    ActQuant,
    act_quant_spec,
    attach_act_quants,
    fake_quantize_act,
    qdrop_mask,
)


@pytest.mark.parametrize("bits, signed, lo, hi", [(4, False, 0, 15), (4, True, -8, 7),
                                                  (2, True, -2, 1), (8, False, 0, 255)])
def test_fake_quant_lands_on_the_grid_with_zero_point_zero(bits, signed, lo, hi) -> None:  # type: ignore[no-untyped-def]
    aq = ActQuant(bits, signed, scale=0.25)
    x = torch.linspace(-100, 100, 4001)
    codes = aq(x) / 0.25
    assert torch.equal(codes, codes.round())
    assert codes.min() == lo and codes.max() == hi
    assert aq(torch.zeros(3)).eq(0).all()  # zero is exact
    inside = (x > lo * 0.25) & (x < hi * 0.25)
    assert (aq(x) - x)[inside].abs().max() <= 0.125 + 1e-6  # half a step at most in range


def test_gradients_are_straight_through_for_x_and_lsq_for_the_step() -> None:
    x = torch.tensor([0.3, 1.1, 2.6, 9.0, -1.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    fake_quantize_act(x, s, 0, 7).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # clipped elements get none
    xs = torch.tensor([0.6, 2.2, 5.2])
    lsq = (xs.round() - xs).sum() + 7 + 0  # inside: round(x/s) - x/s; clipped: qmax / qmin
    assert s.grad.item() == pytest.approx(lsq.item(), abs=1e-5)


def test_minmax_covers_the_range_signed_and_unsigned() -> None:
    x = torch.tensor([-0.5, 0.0, 3.0])
    assert choose_scale(x, -0.5, 3.0, 4, True, "minmax") == pytest.approx(3.0 / 7)
    assert choose_scale(x.clamp(min=0), 0.0, 3.0, 4, False, "minmax") == pytest.approx(3.0 / 15)


def test_mse_and_percentile_clip_outliers_that_minmax_keeps() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)).abs()
    x[0] = 100.0  # one outlier
    lo, hi = 0.0, float(x.max())
    minmax = choose_scale(x, lo, hi, 4, False, "minmax")
    mse = choose_scale(x, lo, hi, 4, False, "mse")
    pct = choose_scale(x, lo, hi, 4, False, "percentile", 99.9)
    assert mse < minmax / 5 and pct < minmax / 5

    def err(scale: float) -> float:
        return (torch.clamp(torch.round(x / scale), 0, 15) * scale - x).pow(2).sum().item()

    assert err(mse) < err(minmax) and err(mse) <= err(pct) * 1.001


def _prepared(cfg: QuantConfig):  # type: ignore[no-untyped-def]
    from adaround.api import prepare_float
    from adaround.prepare import plan_layers, swap_in_quant_layers

    x = images(128)
    fp, trace, _ = prepare_float(tiny_resnet(), x, cfg)
    plans = plan_layers(fp, trace, cfg)
    return swap_in_quant_layers(fp, plans, cfg), [p.name for p in plans], trace.names(), x


def test_calibration_is_unsigned_after_relu_signed_on_the_model_input() -> None:
    cfg = QuantConfig(act_bits=4, input_act_bits=8, last_act_bits=6)
    qmodel, names, order, x = _prepared(cfg)
    found = calibrate_activations(qmodel, names, order, x, cfg)
    assert set(found) == set(names)
    signed = {n: aq.signed for n, aq in found.items()}
    assert signed == {"stem": True, "block.conv1": False, "block.conv2": False, "dw": False,
                      "fc": False}
    bits = {n: aq.bits for n, aq in found.items()}
    assert bits == {"stem": 8, "block.conv1": 4, "block.conv2": 4, "dw": 4, "fc": 6}
    assert act_bits_of("dw", order, cfg) == 4
    # min-max: the largest calibration input lands exactly on the top of the grid
    inputs = []
    hook = qmodel.fc.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    qmodel.fc.act_quant.enabled = False
    with torch.no_grad():
        qmodel(x)
    hook.remove()
    top = torch.cat(inputs).max().item()
    assert found["fc"].range[1] == pytest.approx(top, rel=1e-5)


def test_qdrop_keeps_each_element_quantized_with_probability_p() -> None:
    aq = ActQuant(4, False, scale=0.1)
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) + 0.013
    quantized = aq(x)
    for p in (0.5, 0.2):
        aq.qdrop, aq.generator = p, torch.Generator().manual_seed(1)
        mixed = aq(x)
        share = (mixed == quantized).float().mean().item()
        assert share == pytest.approx(p, abs=0.01)
        assert torch.equal(mixed[mixed != quantized], x[mixed != quantized])  # others in float
    aq.qdrop = 1.0
    assert torch.equal(aq(x), quantized)
    aq.enabled = False
    assert torch.equal(aq(x), x)


def test_quant_layer_quantizes_its_input_and_the_state_dict_carries_the_step() -> None:
    layer = QuantLayer(nn.Linear(4, 2), bits=8, symmetric=True, per_channel=False)
    x = torch.randn(5, 4)
    plain = layer(x)
    layer.act_quant = ActQuant(2, True, scale=1.0)
    assert torch.allclose(layer(x), layer.layer(torch.clamp(torch.round(x), -2, 1)))
    assert not torch.allclose(layer(x), plain)
    assert "act_quant.scale" in layer.state_dict()


def test_quantize_records_act_quant_and_a_rebuilt_model_gives_identical_outputs() -> None:
    model, x = tiny_resnet(), images(128)
    cfg = QuantConfig(weight_bits=4, act_bits=8, iters=50, batch_size=16)
    qmodel = adaround.quantize(model, x, cfg)
    spec = qmodel.adaround_meta["act_quant"]
    assert spec == act_quant_spec(qmodel) and spec["stem"] == {"bits": 8, "signed": True}
    # what load does: the same architecture, ActQuants attached from the spec, then the state
    twin = adaround.quantize(model, x, QuantConfig(weight_bits=4, rounding="nearest"))
    attach_act_quants(twin, spec)
    twin.load_state_dict(qmodel.state_dict())
    test = images(64, seed=5)
    with torch.no_grad():
        assert torch.equal(twin(test), qmodel(test))


def test_w4a8_layerwise_costs_little_against_w4a32() -> None:
    model, x, test = tiny_resnet(), images(256), images(256, seed=7)
    w4 = adaround.quantize(model, x, QuantConfig(weight_bits=4, iters=300, batch_size=16))
    w4a8 = adaround.quantize(model, x, QuantConfig(weight_bits=4, act_bits=8, iters=300,
                                                   batch_size=16))
    with torch.no_grad():
        ref = model(test)
        err32, err8 = ((m(test) - ref).pow(2).mean().item() for m in (w4, w4a8))
    assert err8 < 1.5 * err32


def test_save_and_load_keep_the_input_quantizers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, x = tiny_resnet(), images(128)
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=4, act_bits=4, method="brecq",
                                                     iters=50, batch_size=16))
    adaround.save(qmodel, tmp_path / "m.st")
    loaded = adaround.load(tmp_path / "m.st", model)
    assert act_quant_spec(loaded) == act_quant_spec(qmodel)
    test = images(64, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(test), qmodel(test))


def test_qdrop_mask_follows_the_layout_of_x_and_its_probability() -> None:
    x = torch.randn(8, 6, 20, 20).contiguous(memory_format=torch.channels_last)
    keep = qdrop_mask(x, 0.25, torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool and keep.shape == x.shape and keep.stride() == x.stride()
    assert keep.float().mean().item() == pytest.approx(0.25, abs=0.01)
    again = qdrop_mask(x, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)  # seeded
    assert not qdrop_mask(x, 0.0, None).any() and qdrop_mask(x, 1.0, None).all()


@pytest.mark.parametrize("signed", [False, True])
def test_fused_fake_quant_matches_eager_values_and_gradients(signed: bool) -> None:
    x0 = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(0)) * 3
    keep = qdrop_mask(x0, 0.5, torch.Generator().manual_seed(1))
    qmin, qmax = (-8, 7) if signed else (0, 15)
    results = []
    for fused in (False, True):
        x = x0.clone().requires_grad_(True)
        scale = torch.tensor(0.3, requires_grad=True)
        out = fake_quantize_act(x, scale, qmin, qmax, keep, fused=fused)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), x.grad, scale.grad))
    for eager, fused in zip(*results):
        assert torch.allclose(eager, fused, atol=1e-6)
    assert not torch.equal(results[0][0], x0)  # something was quantized
