"""QUBO solvers against exhaustive search, and stochastic rounding statistics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaround.analysis import (
    RoundingGrid,
    anneal,
    exhaustive,
    input_second_moments,
    local_mse_qubo,
    local_search,
    qubo_from_hessian,
    relaxation,
    task_loss_hessian,
)
from adaround.config import QuantConfig
from adaround.errors import ModelError
from adaround.nn.quant_layer import QuantLayer
from adaround.reconstruct.loop import optimise_rounding


def _layer_qubos(seed: int, bits: int = 3):  # type: ignore[no-untyped-def]
    """Task-loss and local-MSE QUBOs of a real tiny layer: 12 weights, 3 rows of 4."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(seed))
    q = QuantLayer(net[0], bits, symmetric=True, per_channel=False)
    q.fit_grid("mse")
    grid = RoundingGrid.of(q)
    task = qubo_from_hessian(task_loss_hessian(net, "0", x), grid)
    local = local_mse_qubo(input_second_moments(net[0], x), grid)
    return grid, task, local


@pytest.mark.parametrize("seed", range(4))
def test_annealing_finds_the_exhaustive_optimum_on_toy_layers(seed: int) -> None:
    grid, task, local = _layer_qubos(seed)
    g = torch.Generator().manual_seed(seed)
    for qubo in (task, local):
        init = grid.nearest().reshape(qubo.rows, -1)
        best = exhaustive(qubo)
        found = anneal(qubo, init, sweeps=100, generator=g)
        assert torch.allclose(qubo.row_values(found[None]), qubo.row_values(best[None]),
                              rtol=1e-9, atol=1e-15)
        assert float(qubo.value(best)) <= float(qubo.value(init)) + 1e-15


def test_annealing_finds_the_optimum_of_a_dense_16_variable_qubo() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    from adaround.analysis import Qubo

    qubo = Qubo((a @ a.T / 16 + torch.eye(16, dtype=torch.float64))[None],
                -torch.rand(1, 16, generator=g, dtype=torch.float64),
                torch.ones(1, 16, dtype=torch.float64))
    init = torch.zeros(1, 16, dtype=torch.bool)
    assert torch.isclose(qubo.value(anneal(qubo, init, 300, g)), qubo.value(exhaustive(qubo)))


def test_local_search_ends_where_no_single_flip_improves() -> None:
    grid, task, _ = _layer_qubos(7, bits=2)
    found = local_search(task, grid.floor_choice().reshape(1, -1))
    value = task.value(found)
    for i in range(found.numel()):
        flipped = found.clone().reshape(-1)
        flipped[i] = ~flipped[i]
        assert task.value(flipped.reshape(found.shape)) >= value - 1e-15
    assert value <= task.value(grid.floor_choice())


def test_exhaustive_refuses_large_rows() -> None:
    _, task, _ = _layer_qubos(0)
    with pytest.raises(ModelError, match="anneal"):
        exhaustive(task, max_size=8)


def test_stochastic_rounding_is_unbiased_with_the_right_probabilities() -> None:
    torch.manual_seed(0)
    q = QuantLayer(nn.Linear(8, 4), 4, symmetric=True, per_channel=False)
    q.fit_grid("minmax")  # no clipping: every weight has two distinct grid points
    grid = RoundingGrid.of(q)
    samples = grid.stochastic(20000, torch.Generator().manual_seed(1))
    assert samples.shape == (20000, 4, 8) and samples.dtype == torch.bool
    p_up = samples.double().mean(0)
    assert (p_up - grid.fraction()).abs().max() < 0.02  # 4 sigma at n = 20000
    mean_weight = torch.stack([grid.quantized(s) for s in samples[:4000]]).mean(0)
    assert (mean_weight - grid.weight).abs().max() < 0.05 * float(q.scale.max())
    # every sample lands on floor or ceil, and the draws are reproducible
    codes = grid.codes(samples[0])
    assert ((codes == grid.codes(grid.floor_choice())) | (codes == grid.codes(grid.ceil()))).all()
    again = grid.stochastic(20000, torch.Generator().manual_seed(1))
    assert torch.equal(samples, again)


def test_relaxation_returns_the_choice_of_the_core_optimisation() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3, padding=1)
    # correlated inputs: with white noise nearest would already be optimal
    base = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(64, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    x = F.avg_pool2d(base, 2).repeat(1, 2, 1, 1) + 0.3 * noise
    with torch.no_grad():
        target = layer(x)
    q = QuantLayer(layer, 3, symmetric=True, per_channel=False)
    q.fit_grid("mse")
    grid = RoundingGrid.of(q)
    cfg = QuantConfig(weight_bits=3, iters=300, batch_size=16, lr=0.02)
    up = relaxation(q, x, target, None, cfg, torch.Generator().manual_seed(0))
    codes = optimise_rounding(q, x, target, None, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(grid.codes(up), codes)
    local = local_mse_qubo(input_second_moments(layer, x), grid)
    assert local.value(up) < 0.8 * local.value(grid.nearest())
    solved = anneal(local, grid.nearest().reshape(local.rows, -1), 50, torch.Generator())
    assert local.value(solved) <= local.value(up) + 1e-12
