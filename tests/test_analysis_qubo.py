"""Rounding objectives as QUBOs, checked against brute-force enumeration on tiny layers."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adaround.analysis import (
    RoundingGrid,
    input_second_moments,
    local_mse_qubo,
    qubo_from_hessian,
    task_loss_hessian,
)
from adaround.analysis.qubo import Qubo, check_dense
from adaround.errors import ModelError
from adaround.nn.quant_layer import QuantLayer
from adaround.reconstruct.loop import layer_loss


@pytest.fixture(autouse=True)
def _float64():  # type: ignore[no-untyped-def]
    """Exact comparisons in float64; the default dtype is restored for the other tests."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def _grid(layer: nn.Module, bits: int = 3, per_channel: bool = False
          ) -> tuple[QuantLayer, RoundingGrid]:
    q = QuantLayer(layer, bits, symmetric=True, per_channel=per_channel)
    q.fit_grid("mse")
    return q, RoundingGrid.of(q)


def _all_choices(shape: torch.Size) -> torch.Tensor:
    n = int(torch.Size(shape).numel())
    rows = list(itertools.product([False, True], repeat=n))
    return torch.tensor(rows).reshape(len(rows), *shape)


class SamePad(nn.Conv2d):
    """A conv subclass with its own padding in forward, like EfficientNet-Lite's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (0, 1, 1, 0)), self.weight, self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


def test_grid_choices_match_the_core_and_the_error_is_affine() -> None:
    torch.manual_seed(0)
    q, grid = _grid(nn.Linear(6, 5), bits=2)
    assert torch.equal(grid.codes(grid.nearest()), q.nearest_codes())
    assert (grid.codes(grid.ceil()) >= grid.codes(grid.floor_choice())).all()
    d0, step = grid.offsets()
    for up in _all_choices(torch.Size([4]))[:16]:
        choice = torch.zeros(5, 6, dtype=torch.bool)
        choice[0, :4] = up
        assert torch.allclose(grid.quantized(choice), grid.weight + d0 + step * choice)
    assert ((step == 0) | torch.isclose(step, q.scale.expand_as(step))).all()
    assert (step == 0).any()  # a 2-bit MSE grid clips some weights: both choices coincide
    codes = grid.codes(grid.nearest())
    assert torch.equal(grid.codes(grid.choice_of(codes)), codes)


def test_qubo_matrix_form_equals_its_value_for_every_choice() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, 5, generator=g)
    qubo = Qubo(a @ a.transpose(1, 2), torch.randn(2, 5, generator=g),
                torch.rand(2, 5, generator=g), factor=0.7)
    choices = _all_choices(torch.Size([2, 5]))
    q, c = qubo.matrix()
    b = choices.double()
    standard = torch.einsum("krm,rmn,krn->k", b, q, b) + c.sum()
    assert torch.allclose(qubo.values(choices), standard)


def _tiny_net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), act, nn.Flatten(), nn.Linear(8, 3))


def test_task_loss_qubo_equals_the_quadratic_form_of_the_hessian_for_every_choice() -> None:
    net = _tiny_net(nn.ReLU())
    x = torch.randn(24, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        targets = F.softmax(net(x), -1)
    w0 = net[0].weight.detach().clone()

    def loss(w: torch.Tensor) -> torch.Tensor:
        logits = functional_call(net, {"0.weight": w}, (x,))
        return -(targets * F.log_softmax(logits, -1)).sum() / len(x)

    brute = torch.autograd.functional.hessian(loss, w0).reshape(8, 8)
    hessian = task_loss_hessian(net, "0", x, kind="gauss_newton", batch_size=10)
    assert torch.allclose(hessian, brute, atol=1e-12)
    _, grid = _grid(net[0])
    qubo = qubo_from_hessian(hessian, grid)
    choices = _all_choices(w0.shape)
    errors = torch.stack([(grid.quantized(up) - w0).reshape(-1) for up in choices])
    expected = 0.5 * torch.einsum("ki,ij,kj->k", errors, brute, errors)
    assert torch.allclose(qubo.values(choices), expected, atol=1e-12)
    q, c = qubo.matrix()
    b = choices.reshape(len(choices), -1).double()
    assert torch.allclose(torch.einsum("ki,ij,kj->k", b, q[0], b) + c, expected, atol=1e-12)


def test_exact_hessian_is_exact_where_gauss_newton_is_not() -> None:
    net = _tiny_net(nn.Tanh())
    x = torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(4))
    w0 = net[0].weight.detach().clone()

    def loss(w: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, {"0.weight": w}, (x,)), y)

    brute = torch.autograd.functional.hessian(loss, w0).reshape(8, 8)
    exact = task_loss_hessian(net, "0", x, kind="exact", labels=y, batch_size=7)
    gauss_newton = task_loss_hessian(net, "0", x, kind="gauss_newton", batch_size=7)
    assert torch.allclose(exact, brute, atol=1e-12)
    assert (gauss_newton - brute).norm() > 0.1 * brute.norm()  # labels + tanh: GN differs


def test_empirical_fisher_is_the_mean_outer_product_of_per_sample_gradients() -> None:
    net = _tiny_net(nn.ReLU())
    x = torch.randn(9, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(6))
    grads = []
    for i in range(9):
        (g,) = torch.autograd.grad(F.cross_entropy(net(x[i: i + 1]), y[i: i + 1]),
                                   net[0].weight)
        grads.append(g.reshape(-1))
    g = torch.stack(grads)
    fisher = task_loss_hessian(net, "0", x, kind="fisher", labels=y, batch_size=4)
    assert torch.allclose(fisher, g.T @ g / 9, atol=1e-12)


def test_gauss_newton_over_top_classes_is_a_lower_bound() -> None:
    net = _tiny_net(nn.ReLU())
    x = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    full = task_loss_hessian(net, "0", x)
    top = task_loss_hessian(net, "0", x, max_classes=2)
    assert torch.linalg.eigvalsh(full - top).min() > -1e-12
    assert (full - top).norm() > 0


@pytest.mark.parametrize("layer, shape, per_channel", [
    (nn.Conv2d(1, 2, 2, stride=2, padding=1), (5, 1, 5, 5), False),
    (nn.Conv2d(1, 2, 2, stride=2, padding=1), (5, 1, 5, 5), True),
    (nn.Conv2d(2, 2, 2, groups=2, dilation=2), (5, 2, 5, 5), False),
    (nn.Conv1d(2, 2, 2, padding=1), (5, 2, 6), False),
    (SamePad(1, 2, 2, stride=2), (5, 1, 5, 5), False),
    (nn.Linear(3, 2), (5, 4, 3), True),
])
def test_local_mse_qubo_is_the_output_mse_for_every_choice(layer, shape, per_channel) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    layer = layer.double()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(8))
    q, grid = _grid(layer, per_channel=per_channel)
    with torch.no_grad():
        target = layer(x)
    qubo = local_mse_qubo(input_second_moments(layer, x, chunk=2), grid)
    assert qubo.rows == grid.weight.shape[0]
    choices = _all_choices(grid.weight.shape)
    expected = torch.tensor([layer_loss(q, grid.quantized(up), x, target, None)
                             for up in choices])
    assert torch.allclose(qubo.values(choices), expected, rtol=1e-9, atol=1e-12)


def test_layers_too_large_or_unsupported_are_refused_with_the_fix() -> None:
    with pytest.raises(ModelError, match="raise max_dense"):
        check_dense("layer big", 5000)
    net = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 2))
    with pytest.raises(ModelError, match="1200 weights"):
        task_loss_hessian(net, "0", torch.randn(4, 40), max_dense=1000)
    with pytest.raises(ModelError, match="Conv or Linear"):
        input_second_moments(nn.ConvTranspose2d(2, 2, 2), torch.randn(2, 2, 3, 3))
