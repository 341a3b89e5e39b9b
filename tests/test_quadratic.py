import logging

import pytest
import torch
from tiny_models import SamePadConv, images, sequences, tiny_mixed, tiny_resnet
from torch import nn

import adaround
from adaround import QuantConfig, QuantLayer
from adaround.errors import ConfigError
from adaround.nn.quant_layer import apply_layer
from adaround.primitives import init_v, reconstruction_loss, rectified_sigmoid, soft_weight
from adaround.reconstruct import quadratic
from adaround.reconstruct.loop import QuadraticLoss
from adaround.reconstruct.quadratic import (
    accumulate_moments,
    quadratic_loss,
    supports_quadratic,
    weight_rows,
)

LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (12, 3, 7)),  # leading dims averaged like samples
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2), (6, 4, 11, 9)),
    "conv2d_rect": (lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(2, 1),
                                      dilation=(1, 2)), (5, 3, 9, 8)),
    "grouped": (lambda: nn.Conv2d(4, 6, (3, 2), padding=(1, 0), groups=2), (6, 4, 8, 9)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 6, 8, 8)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 4, stride=3, padding=2, dilation=2), (6, 3, 17)),
    "conv2d_reflect_same": (lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2,
                                              padding_mode="reflect"), (6, 3, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1), (4, 2, 5, 6, 4)),
    "same_pad_subclass": (SamePadConv, (6, 3, 9, 9)),  # its own forward pads first
}


def _case(name: str) -> tuple[QuantLayer, torch.Tensor, torch.Tensor]:
    """A float64 layer on a 3-bit grid, its FP input x and a perturbed quantized-stream x^."""
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    qlayer = QuantLayer(make().double(), bits=3, symmetric=True, per_channel=False)
    qlayer.fit_grid("mse")
    x = torch.randn(shape, dtype=torch.float64)
    return qlayer, x + 0.1 * torch.randn_like(x), x


def _sampled_full_batch(qlayer: QuantLayer, weight: torch.Tensor, x_q: torch.Tensor,
                        x: torch.Tensor) -> torch.Tensor:
    target = qlayer.layer(x).detach()
    return reconstruction_loss(apply_layer(qlayer.layer, x_q, weight), target, qlayer.channel_dim)


@pytest.mark.parametrize("name", list(LAYERS))
def test_quadratic_loss_and_its_gradient_equal_the_full_batch_sampled_loss(name: str) -> None:
    qlayer, x_q, x = _case(name)
    chunks = list(zip(x_q.split(4), x.split(4)))  # several chunks, the last one partial
    loss = QuadraticLoss(qlayer, accumulate_moments(qlayer.layer, chunks))
    w = qlayer.layer.weight.detach()
    w_floor = torch.floor(w / qlayer.scale)
    grads, values = [], []
    for fn in (lambda wt: _sampled_full_batch(qlayer, wt, x_q, x), loss):
        v = torch.nn.Parameter(init_v(w / qlayer.scale - w_floor) + 0.3)
        weight = soft_weight(w_floor, rectified_sigmoid(v), qlayer.scale, qlayer.zero_point,
                             qlayer.qmin, qlayer.qmax)
        value = fn(weight)
        value.backward()
        values.append(value.item())
        grads.append(v.grad)
    assert values[1] == pytest.approx(values[0], rel=1e-10)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


def test_moments_do_not_depend_on_how_the_data_is_cut(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    qlayer, x_q, x = _case("grouped")
    whole = accumulate_moments(qlayer.layer, [(x_q, x)])
    monkeypatch.setattr(quadratic, "PATCH_BUDGET", 100)  # blocks of one sample
    cut = accumulate_moments(qlayer.layer, zip(x_q.split(4), x.split(4)))
    assert cut.count == whole.count == 6 * 8 * 8
    for a, b in [(cut.a, whole.a), (cut.r, whole.r), (cut.c, whole.c)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_subsample_takes_each_position_once_over_every_squared_samples() -> None:
    from adaround.reconstruct.quadratic import subsample

    # positions of 9 samples of 5 x 4 outputs, numbered; every=3: each sample's shifted grid
    v = torch.arange(9 * 5 * 4).reshape(9, 5, 4)
    taken = torch.cat([s.reshape(-1) for s in subsample(v, 3)])
    assert len(taken) == len(set(taken.tolist()))  # no position twice
    per_offset = [s.numel() for s in subsample(v, 3)]
    # the 9 shifted grids partition one image's positions: exactly 1/9 of 9 samples' ones
    assert sum(per_offset) == 5 * 4
    # across the 9 samples every (row, column) offset modulo 3 is taken exactly once
    offsets = {(int(t) % 20 // 4 % 3, int(t) % 4 % 3) for s in subsample(v, 3) for t in s[:1, :1]
               .reshape(-1)}
    assert offsets == {(a, b) for a in range(3) for b in range(3)}


@pytest.mark.parametrize("name", ["conv2d_rect", "grouped", "linear", "conv1d"])
def test_moments_from_a_share_of_the_positions(name: str) -> None:
    qlayer, x_q, x = _case(name)
    whole = accumulate_moments(qlayer.layer, [(x_q, x)])
    part = accumulate_moments(qlayer.layer, [(x_q, x)], keep=0.5, seed=3)
    assert part.count <= round(whole.count * 0.5)  # at most that share
    # the same positions whatever the chunks (blocks of equal size draw the same subset)
    again = accumulate_moments(qlayer.layer, [(x_q, x)], keep=0.5, seed=3)
    assert torch.equal(part.a, again.a) and torch.equal(part.r, again.r)
    assert not torch.equal(part.a, whole.a)  # an estimate (these few positions: a rough one)
    # and the exact moments of exactly those positions: keep=1 on the gathered rows
    from adaround.reconstruct.quadratic import patch_rows, subsample_step, weight_order

    layer = qlayer.layer
    rows = patch_rows(layer, quadratic.conv_input(layer, x_q), subsample_step(0.5), 3)
    order = weight_order(layer)
    a = torch.bmm(rows.transpose(1, 2), rows) / rows.shape[1]
    if order is not None:
        a = a[:, order][:, :, order]
    torch.testing.assert_close(part.a, (a + a.transpose(1, 2)) / 2)


def test_quadratic_form_gradient_is_the_analytic_one() -> None:
    qlayer, x_q, x = _case("conv2d")
    moments = accumulate_moments(qlayer.layer, [(x_q, x)])
    dw = (0.1 * torch.randn_like(weight_rows(qlayer.layer, qlayer.layer.weight))).requires_grad_()
    assert torch.autograd.gradcheck(lambda d: quadratic_loss(moments, d), (dw,))


def test_layers_without_an_unfold_are_left_to_the_sampled_loss() -> None:
    assert supports_quadratic(nn.Conv2d(2, 2, 3)) and supports_quadratic(nn.Linear(2, 2))
    assert not supports_quadratic(nn.ConvTranspose2d(2, 2, 2))

    class OwnForward(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x[..., 1:, 1:])

    # a subclass is unfolded at the input its one convolution really receives
    layer = OwnForward(2, 2, 3)
    assert supports_quadratic(layer)
    x = torch.randn(1, 2, 6, 6)
    assert torch.equal(quadratic.conv_input(layer, x), x[..., 1:, 1:])


def test_quantize_with_the_quadratic_loss_beats_nearest_and_says_so(caplog) -> None:  # type: ignore[no-untyped-def]
    model, x, test = tiny_resnet(), images(256), images(256, seed=7)
    with caplog.at_level(logging.INFO, logger="adaround"):
        qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=3, iters=300,
                                                         batch_size=16, loss="quadratic"))
    nearest = adaround.quantize(model, x, QuantConfig(weight_bits=3, rounding="nearest"))
    with torch.no_grad():
        assert (qmodel(test) - model(test)).pow(2).mean() < (nearest(test) - model(test)).pow(
            2).mean()
    assert {r.objective for r in qmodel.adaround_report} == {"quadratic"}
    assert "300/300 steps on the quadratic loss before relu" in caplog.text


@pytest.mark.parametrize("loss", ["quadratic", "quadratic_warmup"])
def test_transposed_convolutions_fall_back_to_the_sampled_loss(loss: str, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="adaround"):
        qmodel = adaround.quantize(tiny_mixed(), sequences(64), QuantConfig(
            weight_bits=4, iters=50, batch_size=16, loss=loss))
    objectives = {r.name: r.objective for r in qmodel.adaround_report}
    assert objectives == {"conv1d": loss, "up": "sampled", "fc": loss, "head": loss}
    assert "up: the quadratic loss does not unfold ConvTranspose2d" in caplog.text


def test_loss_options_are_validated() -> None:
    assert QuantConfig().loss == "auto"
    with pytest.raises(ConfigError, match="loss='exact'.*auto, sampled, quadratic, quadratic_"):
        QuantConfig(loss="exact")
    with pytest.raises(ConfigError, match="early_stop must be True or False"):
        QuantConfig(early_stop="yes")  # type: ignore[arg-type]
    assert QuantConfig.from_dict(QuantConfig(loss="quadratic").to_dict()).loss == "quadratic"


def test_auto_takes_the_quadratic_loss_where_its_step_is_cheaper() -> None:
    torch.manual_seed(0)
    # conv: d = 27, 36 positions per sample -> a quadratic step is far cheaper; the Linear
    # layers (one position per sample) have d x d forms dearer than a batch of 8 samples
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 40),
                          nn.ReLU(), nn.Linear(40, 2))
    qmodel = adaround.quantize(model, images(32), QuantConfig(iters=20, batch_size=8))
    objectives = {r.name: r.objective for r in qmodel.adaround_report}
    assert objectives == {"0": "quadratic", "3": "sampled", "5": "sampled"}
    assert quadratic.step_costs(model[0], images(2), 8) == (4 * 27 * 27, 3 * 8 * 36 * 4 * 27)
    assert quadratic.step_costs(model[5], torch.randn(2, 40), 8) == (2 * 40 * 40, 3 * 8 * 2 * 40)


class TwoConvs(nn.Conv2d):
    """A subclass whose forward is not one convolution: cannot be unfolded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight) + nn.functional.conv2d(x, self.weight)


def test_subclass_that_is_not_one_convolution_falls_back(caplog) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(TwoConvs(3, 4, 3), nn.ReLU())
    with caplog.at_level(logging.INFO, logger="adaround"):
        adaround.quantize(model, images(32), QuantConfig(loss="quadratic", iters=20,
                                                          batch_size=8))
    assert "is not one convolution with its weight; using the sampled loss" in caplog.text


def test_gram_from_blocks_equals_one_product() -> None:
    for d in (13, 40, 300):  # one product, 2 x 2 and 4 x 4 blocks
        u = torch.randn(2, 50, d, dtype=torch.float64)
        torch.testing.assert_close(quadratic.gram(u), torch.bmm(u.transpose(1, 2), u))


def test_moment_positions_caps_the_moments_data_and_is_exact_above_the_count() -> None:
    torch.manual_seed(0)
    model, x = tiny_resnet(), images(32)

    def run(**kw):  # type: ignore[no-untyped-def]
        q = adaround.quantize(model, x, QuantConfig(loss="quadratic", iters=60, lr=0.05, **kw))
        return [m.codes for m in q.modules() if isinstance(m, QuantLayer)], q.adaround_report

    exact, report = run(moment_positions=None)
    above, _ = run(moment_positions=10**9)
    assert all(torch.equal(a, b) for a, b in zip(exact, above))
    capped, capped_report = run(moment_positions=256)
    assert not all(torch.equal(a, b) for a, b in zip(exact, capped))
    # still AdaRound's gain over nearest on the exact loss, layer by layer (the losses
    # reported are measured on the calibration data, not on the subsample)
    assert sum(r.loss_adaround for r in capped_report) < sum(r.loss_nearest for r in capped_report)


def test_fast_preset_is_a_config_with_overrides() -> None:
    from adaround.config import FAST_PRESET

    cfg = QuantConfig.fast(weight_bits=3)
    assert cfg.weight_bits == 3 and cfg.iters == FAST_PRESET["iters"]
    assert cfg.moment_positions == FAST_PRESET["moment_positions"]
    assert QuantConfig.fast(iters=50).iters == 50
    with pytest.raises(ConfigError, match="moment_positions"):
        QuantConfig(moment_positions=0)
