import math

import pytest
import torch

from adaround.primitives import (
    GAMMA,
    ZETA,
    beta_at,
    hard_codes,
    init_v,
    int_range,
    reconstruction_loss,
    rectified_sigmoid,
    round_regularizer,
    soft_weight,
)


def test_int_range() -> None:
    assert int_range(4, True) == (-8, 7)
    assert int_range(4, False) == (0, 15)
    assert int_range(2, True) == (-2, 1)
    assert int_range(8, False) == (0, 255)


def test_rectified_sigmoid_stays_in_unit_interval_and_saturates() -> None:
    v = torch.linspace(-50, 50, 1001)
    h = rectified_sigmoid(v)
    assert h.min().item() == 0.0 and h.max().item() == 1.0
    assert (h[1:] >= h[:-1]).all()
    assert rectified_sigmoid(torch.tensor(0.0)).item() == pytest.approx(0.5)
    # saturates at finite V, which plain sigmoid never does
    assert rectified_sigmoid(torch.tensor(math.log((ZETA - 0) / (0 - GAMMA)) + 0.1)).item() == 1.0


def test_init_v_inverts_h_on_the_fractional_part() -> None:
    frac = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.999
    assert torch.allclose(rectified_sigmoid(init_v(frac)), frac, atol=1e-5)


def test_hard_rounding_lands_on_floor_or_ceil() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(500, generator=g) * 3
    w_floor = torch.floor(w)
    v = torch.randn(500, generator=g) * 4
    codes = hard_codes(w_floor, v, torch.zeros(()), -100, 100)
    assert ((codes == w_floor) | (codes == w_floor + 1)).all()
    up = rectified_sigmoid(v) >= 0.5
    assert torch.equal(codes == w_floor + 1, up)


def test_hard_codes_clip_to_grid() -> None:
    codes = hard_codes(torch.tensor([7.0, -9.0]), torch.tensor([10.0, -10.0]), torch.zeros(()),
                       -8, 7)
    assert codes.tolist() == [7.0, -8.0]


def test_soft_weight_equals_hard_weight_when_h_is_binary() -> None:
    w_floor = torch.tensor([-3.0, 0.0, 2.0])
    h = torch.tensor([1.0, 0.0, 1.0])
    s = torch.tensor(0.5)
    assert soft_weight(w_floor, h, s, torch.zeros(()), -8, 7).tolist() == [-1.0, 0.0, 1.5]


def test_regularizer_values() -> None:
    assert round_regularizer(torch.tensor([0.0, 1.0]), 2.0).item() == 0.0
    assert round_regularizer(torch.tensor([0.5]), 20.0).item() == 1.0
    # at h = 0.75, |2h-1| = 0.5: f = 1 - 0.5^beta
    assert round_regularizer(torch.tensor([0.75]), 2.0).item() == pytest.approx(0.75)
    assert round_regularizer(torch.tensor([0.75]), 20.0).item() == pytest.approx(1 - 0.5**20)


def test_beta_schedule_warm_start_then_anneals_20_to_2() -> None:
    iters = 1000
    assert beta_at(0, iters, 0.2, 20, 2) is None
    assert beta_at(199, iters, 0.2, 20, 2) is None
    assert beta_at(200, iters, 0.2, 20, 2) == pytest.approx(20.0)
    assert beta_at(600, iters, 0.2, 20, 2) == pytest.approx(11.0)  # cosine midpoint
    assert beta_at(999, iters, 0.2, 20, 2) == pytest.approx(2.0, abs=1e-3)
    assert beta_at(400, iters, 0.2, 20, 2, "linear") == pytest.approx(15.5)
    values = [beta_at(s, iters, 0.2, 20, 2) for s in range(200, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_reconstruction_loss_sums_channels_and_averages_the_rest() -> None:
    out = torch.zeros(2, 3, 4, 4)
    target = torch.ones(2, 3, 4, 4)
    assert reconstruction_loss(out, target, 1).item() == pytest.approx(3.0)
    assert reconstruction_loss(torch.zeros(5, 7), torch.ones(5, 7), -1).item() == pytest.approx(7)
