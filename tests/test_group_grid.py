"""Group-wise weight grids: one scale (and zero point) per run of `group_size` input weights."""

import pytest
import torch
from torch import nn

from adaround import ConfigError, QuantConfig, quantize
from adaround.config import CONFIG_VERSION
from adaround.nn.quant_layer import QuantLayer
from adaround.primitives import fake_quantize, int_range
from adaround.quantizers import expand_grid, fit_grid, grid_shape, group_rows
from adaround.reconstruct.loop import Objective, QuadraticLoss, run_rounding
from adaround.reconstruct.quadratic import accumulate_moments


def test_group_rows_are_consecutive_input_weights_of_one_output_channel() -> None:
    w = torch.arange(2 * 8).float().reshape(2, 8)
    rows = group_rows(w, 4)
    assert rows.shape == (4, 4)
    assert rows[1].tolist() == [4, 5, 6, 7] and rows[2].tolist() == [8, 9, 10, 11]
    assert grid_shape(w, 0, 4) == (2, 2)
    param = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert expand_grid(param, w, 4).tolist() == [[1, 1, 1, 1, 2, 2, 2, 2], [3, 3, 3, 3, 4, 4, 4, 4]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_each_group_gets_the_grid_it_would_get_alone(symmetric: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 12) * torch.tensor([0.1, 1.0, 10.0]).repeat_interleave(4)
    scale, zero_point = fit_grid(w, 4, symmetric, axis=0, group_size=4)
    assert scale.shape == (3, 3) and zero_point.shape == (3, 3)
    for c in range(3):
        for g in range(3):
            alone_s, alone_z = fit_grid(w[c, 4 * g:4 * g + 4], 4, symmetric, axis=None)
            assert torch.allclose(scale[c, g], alone_s.reshape(())), (c, g)
            assert torch.equal(zero_point[c, g], alone_z.reshape(()))


def test_groups_never_fit_worse_than_channels() -> None:
    torch.manual_seed(1)
    w = torch.randn(8, 64) * torch.rand(1, 64).mul(4).exp()  # input columns of varied range
    qmin, qmax = int_range(3, True)
    errors = {}
    for name, group in (("channel", None), ("g32", 32), ("g8", 8)):
        s, z = fit_grid(w, 3, True, axis=0, group_size=group)
        s, z = expand_grid(s, w, group), expand_grid(z, w, group)
        errors[name] = (fake_quantize(w, s, z, qmin, qmax) - w).pow(2).sum().item()
    assert errors["g8"] <= errors["g32"] <= errors["channel"]
    assert errors["g8"] < 0.8 * errors["channel"]


def test_quant_layer_stores_group_scales_and_computes_with_them() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(16, 4)
    q = QuantLayer(layer, 4, True, per_channel=False, group_size=8)
    q.fit_grid("mse")
    assert q.scale.shape == (4, 2) and q.axis == 0 and "group(8)" in repr(q)
    assert q.weight_scale().shape == layer.weight.shape
    q.set_codes(q.nearest_codes())
    per_group = torch.cat([
        fake_quantize(layer.weight[:, :8], q.scale[:, :1], q.zero_point[:, :1], -8, 7),
        fake_quantize(layer.weight[:, 8:], q.scale[:, 1:], q.zero_point[:, 1:], -8, 7)], dim=1)
    assert torch.allclose(q.quantized_weight(), per_group)
    x = torch.randn(5, 16)
    assert torch.allclose(q(x), x @ per_group.T + layer.bias, atol=1e-6)


def test_group_size_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(ConfigError, match="group_size"):
        QuantConfig(group_size=0)
    with pytest.raises(ConfigError, match="divisor of 20"):
        QuantLayer(nn.Linear(20, 4), 4, True, True, group_size=8)
    with pytest.raises(ConfigError, match="exclude the convolutions"):
        QuantLayer(nn.Conv2d(8, 4, 3), 4, True, True, group_size=4)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="does not divide the input dimension 8"):
        quantize(net, torch.randn(64, 16), QuantConfig(group_size=16, rounding="nearest"))


def test_config_with_groups_implies_per_channel_and_round_trips() -> None:
    cfg = QuantConfig(group_size=64)
    assert cfg.per_channel and cfg.version == CONFIG_VERSION
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig().group_size is None


def test_rounding_loop_on_groups_lands_on_the_group_grid_and_beats_nearest() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(32, 6)
    q = QuantLayer(layer, 3, True, True, group_size=8)
    q.fit_grid("mse")
    x = torch.randn(512, 32)
    moments = accumulate_moments(layer, [(x, x)])
    cfg = QuantConfig(weight_bits=3, group_size=8, iters=400, loss="quadratic")
    codes, _ = run_rounding(q, Objective(QuadraticLoss(q, moments)), cfg)
    floor = torch.floor(layer.weight / q.weight_scale())
    assert ((codes == floor) | (codes == floor + 1) | (codes == -4) | (codes == 3)).all()
    target = layer(x)

    def error(c: torch.Tensor) -> float:
        q.set_codes(c)
        return (q(x) - target).pow(2).sum(-1).mean().item()

    assert error(codes) < error(q.nearest_codes())


def test_quantize_end_to_end_with_groups_saves_and_loads(tmp_path) -> None:
    import adaround

    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = QuantConfig(weight_bits=4, group_size=16, iters=50, batch_size=16)
    qnet = quantize(net, torch.randn(128, 32), cfg)
    assert qnet[0].scale.shape == (16, 2) and qnet[2].scale.shape == (4, 1)
    path = tmp_path / "g.safetensors"
    adaround.save(qnet, path)
    back = adaround.load(path, net)
    x = torch.randn(7, 32)
    assert torch.equal(back(x), qnet(x))


def test_onnx_export_of_groups_is_blocked_dequantize_linear_matching_onnxruntime() -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from adaround.export import build_onnx

    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    for shape, symmetric in (((32,), True), ((5, 32), False)):  # Gemm, and MatMul (transposed)
        cfg = QuantConfig(rounding="nearest", group_size=8, symmetric=symmetric)
        qnet = quantize(net, torch.randn(64, *shape), cfg)
        proto = build_onnx(qnet, torch.randn(1, *shape))
        dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == 2 and all(
            {a.name: a.i for a in n.attribute}["block_size"] == 8 for n in dq)
        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        x = torch.randn(3, *shape)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, qnet(x).numpy(), atol=1e-5, rtol=0)
    assert onnx.checker.check_model(proto) is None


def test_encodings_export_refuses_groups_with_the_fix(tmp_path) -> None:
    pytest.importorskip("onnx")
    from adaround import ExportError, export_encodings

    net = nn.Sequential(nn.Linear(32, 4))
    qnet = quantize(net, torch.randn(64, 32), QuantConfig(rounding="nearest", group_size=16))
    with pytest.raises(ExportError, match="export this model as ONNX"):
        export_encodings(qnet, tmp_path / "e.json")


def test_group_grids_in_block_reconstruction() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), Block(), torch.nn.Linear(64, 4))
    x = torch.randn(128, 32)
    cfg = dict(weight_bits=3, group_size=32, iters=100, batch_size=16)
    block = quantize(model, x, QuantConfig(unit="block", blocks=("1",), **cfg))
    nearest = quantize(model, x, QuantConfig(rounding="nearest", **cfg))
    assert block.get_submodule("1.a").scale.shape == (64, 2)
    err = (block(x) - model(x)).pow(2).mean()
    assert err < (nearest(x) - model(x)).pow(2).mean()
