import torch

from adaround.primitives import fake_quantize, int_range
from adaround.quantizers import fit_grid


def _err(w: torch.Tensor, scale: float, bits: int = 4) -> float:
    qmin, qmax = int_range(bits, True)
    s = torch.tensor(scale)
    return (fake_quantize(w, s, torch.zeros(()), qmin, qmax) - w).pow(2).sum().item()


def test_mse_search_clips_an_outlier_and_finds_the_optimal_scale() -> None:
    # 3000 weights on the 0.1 grid in [-0.7, 0.7] and one outlier at 1.4: clipping the outlier
    # at scale 0.1 costs 0.49, while any other scale misrounds many of the others.
    grid_values = torch.arange(-7, 8).float() * 0.1
    w = torch.cat([grid_values.repeat(200), torch.tensor([1.4])])
    scale, zero_point = fit_grid(w, bits=4, symmetric=True, axis=None, method="mse")
    assert abs(scale.item() - 0.1) < 1e-6
    assert zero_point.item() == 0
    best = _err(w, scale.item())
    dense = torch.linspace(0.01, 0.25, 2401)
    # the 100-point ratio search lands within 0.1 % of the error of a 2401-point dense search
    assert best <= min(_err(w, s.item()) for s in dense) * 1.001
    minmax, _ = fit_grid(w, bits=4, symmetric=True, axis=None, method="minmax")
    assert abs(minmax.item() - 0.2) < 1e-6
    assert _err(w, minmax.item()) > best


def test_per_channel_grids_are_independent() -> None:
    w = torch.stack([torch.linspace(-1, 1, 50), torch.linspace(-10, 10, 50)])
    s_tensor, _ = fit_grid(w, 4, True, axis=None)
    s_channel, _ = fit_grid(w, 4, True, axis=0)
    assert s_tensor.shape == (1, 1) and s_channel.shape == (2, 1)
    assert s_channel[1, 0] / s_channel[0, 0] > 5
    qmin, qmax = int_range(4, True)
    err_t = (fake_quantize(w, s_tensor, torch.zeros(()), qmin, qmax) - w).pow(2).sum()
    err_c = (fake_quantize(w, s_channel, torch.zeros(()), qmin, qmax) - w).pow(2).sum()
    assert err_c < err_t


def test_asymmetric_grid_covers_a_positive_range() -> None:
    w = torch.linspace(0.0, 1.5, 16)
    scale, zero_point = fit_grid(w, 4, symmetric=False, axis=None, method="minmax")
    assert zero_point.item() == 0
    assert abs(scale.item() - 0.1) < 1e-6
    err = (fake_quantize(w, scale, zero_point, 0, 15) - w).abs().max().item()
    assert err < 1e-5


def test_all_zero_channel_gets_a_usable_scale() -> None:
    w = torch.zeros(2, 3)
    w[1] = torch.tensor([0.5, -0.5, 0.25])
    scale, _ = fit_grid(w, 4, True, axis=0)
    assert torch.isfinite(scale).all() and (scale > 0).all()
