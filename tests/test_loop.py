import logging

import pytest
import torch
from torch import nn

import adaround
from adaround import QuantConfig, QuantLayer
from adaround.reconstruct.loop import EarlyStop


def _codes(qmodel: nn.Module) -> list[torch.Tensor]:
    return [m.codes for m in qmodel.modules() if isinstance(m, QuantLayer)]


def _toy() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(256, 16)


@pytest.mark.parametrize("soft_step, stop_step", [(5, 109), (15, 129)])
def test_early_stop_needs_every_h_binary_for_a_whole_window(soft_step, stop_step) -> None:  # type: ignore[no-untyped-def]
    stop, binary, soft = EarlyStop(), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0])
    said = [stop.update(step, lambda step=step: soft if step == soft_step else binary)
            for step in range(300)]
    # a soft h before the first binary check (step 9) is not looked at; after it, every step
    # is, so one at step 15 restarts the window at the check of step 29
    assert said.index(True) == stop_step


def test_early_stop_triggers_and_gives_the_codes_of_a_full_run(caplog) -> None:  # type: ignore[no-untyped-def]
    model, x = _toy()
    # large steps and a strong, soon sharp regularizer saturate every h well before the end
    cfg = dict(weight_bits=3, iters=500, batch_size=16, lr=2e-2, reg_weight=1.0, beta_start=4.0)
    for loss in ("sampled", "quadratic"):
        with caplog.at_level(logging.INFO, logger="adaround"):
            early = adaround.quantize(model, x, QuantConfig(loss=loss, **cfg))
        full = adaround.quantize(model, x, QuantConfig(loss=loss, early_stop=False, **cfg))
        steps = [r.iters for r in early.adaround_report]
        assert all(200 <= n < 500 for n in steps), steps  # warm start + window at least
        assert [r.iters for r in full.adaround_report] == [500, 500]
        # the second layer too: the skipped steps' batches are drawn, so it sees the same ones
        assert all(torch.equal(a, b) for a, b in zip(_codes(early), _codes(full)))
    assert f"{steps[0]}/500 steps on the quadratic loss" in caplog.text


def test_results_equal_a_full_run_when_early_stop_does_not_trigger() -> None:
    model, x = _toy()
    cfg = dict(weight_bits=3, iters=300, batch_size=16)
    on = adaround.quantize(model, x, QuantConfig(**cfg))
    off = adaround.quantize(model, x, QuantConfig(early_stop=False, **cfg))
    assert [r.iters for r in on.adaround_report] == [300, 300]
    assert all(torch.equal(a, b) for a, b in zip(_codes(on), _codes(off)))
    assert on.adaround_report[1].loss_adaround == off.adaround_report[1].loss_adaround


def _autograd_reference(qlayer, objective, cfg):  # type: ignore[no-untyped-def]
    """The loop as the paper writes it: autograd through W~(V) and f_reg, torch.optim.Adam."""
    from adaround.primitives import (
        beta_at,
        hard_codes,
        init_v,
        rectified_sigmoid,
        round_regularizer,
        soft_weight,
    )

    w, s, zp = qlayer.layer.weight.detach(), qlayer.scale, qlayer.zero_point
    w_floor = torch.floor(w / s)
    v = torch.nn.Parameter(init_v(w / s - w_floor))
    opt = torch.optim.Adam([v], lr=cfg.lr)
    for step in range(cfg.iters):
        h = rectified_sigmoid(v)
        loss = objective.at(step)(soft_weight(w_floor, h, s, zp, qlayer.qmin, qlayer.qmax))
        beta = beta_at(step, cfg.iters, cfg.warm_start, cfg.beta_start, cfg.beta_end)
        if beta is not None:
            loss = loss + cfg.reg_weight * round_regularizer(h, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return hard_codes(w_floor, v.detach(), zp, qlayer.qmin, qlayer.qmax), v.detach()


@pytest.mark.parametrize("loss", ["sampled", "quadratic"])
def test_written_out_gradient_loop_equals_the_autograd_loop(loss: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from adaround.reconstruct import loop
    from adaround.reconstruct.loop import Objective, QuadraticLoss, SampledLoss, run_rounding
    from adaround.reconstruct.quadratic import accumulate_moments

    # torch.optim.Adam's own (foreach) arithmetic: the fused kernel differs from it in the
    # last bit (tested below), which 300 noisy sampled steps can amplify into a flipped code
    monkeypatch.setattr(loop, "_FUSED_ADAM", False)

    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1).double()
    qlayer = QuantLayer(layer, bits=3, symmetric=False, per_channel=True)
    qlayer.fit_grid("mse")
    x = torch.randn(64, 4, 6, 6, dtype=torch.float64)
    x_q = x + 0.2 * torch.randn_like(x)
    cfg = QuantConfig(weight_bits=3, iters=300, lr=1e-2, reg_weight=0.1, early_stop=False)

    def objective():  # type: ignore[no-untyped-def]
        if loss == "quadratic":
            return Objective(QuadraticLoss(qlayer, accumulate_moments(layer, [(x_q, x)])))
        gen = torch.Generator().manual_seed(1)
        target = torch.relu(layer(x)).detach()
        return Objective(SampledLoss(qlayer, x_q, target, torch.relu, 16, gen))

    ours, _ = run_rounding(qlayer, objective(), cfg)
    ref, v = _autograd_reference(qlayer, objective(), cfg)
    h = torch.sigmoid(v) * 1.2 - 0.1
    assert ((h > 0.05) & (h < 0.95)).float().mean() < 0.5  # the run got somewhere
    assert not torch.equal(ref, qlayer.nearest_codes())  # and learned something
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("beta", [None, 20.0, 2.0, 1.5])
def test_buffered_chain_gives_the_gradient_of_the_plain_formulas(beta) -> None:  # type: ignore[no-untyped-def]
    from adaround.primitives import GAMMA, ZETA
    from adaround.reconstruct.loop import Relaxation

    gen = torch.Generator().manual_seed(0)
    # V across and beyond the clip (|V| > log 11: h exactly 0 or 1), exact 0 and the edges
    v = torch.cat([torch.randn(997, dtype=torch.float64, generator=gen) * 3,
                   torch.tensor([0.0, 2.3978952728, -2.3978952728, 50.0, -50.0],
                                dtype=torch.float64)])
    s_live = torch.rand(v.shape, dtype=torch.float64, generator=gen) * (torch.rand(
        v.shape, generator=gen) > 0.1)
    grad_w = torch.randn(v.shape, dtype=torch.float64, generator=gen)
    relax = Relaxation(v, s_live)
    h = relax.update(v)
    sig = torch.sigmoid(v)
    h_ref = (sig * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    inside = (h_ref > 0) & (h_ref < 1)
    assert torch.equal(h, h_ref)
    assert torch.equal(relax.soft(), inside.double())
    ref = grad_w * s_live
    if beta is not None:
        u = 2 * h_ref - 1
        ref = ref + 0.01 * (-2 * beta) * u.abs().pow(beta - 1) * u.sign()
    ref = torch.where(inside, ref * sig * (1 - sig) * (ZETA - GAMMA), 0.0)
    given = grad_w.clone()
    got = relax.v_grad(grad_w, beta, 0.01)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)
    assert torch.equal(grad_w, given)  # the caller's gradient is left unchanged


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_adam_follows_torch_adam_to_the_last_bit(dtype: torch.dtype, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from adaround.reconstruct import loop

    shape = (6, 5, 3, 3)
    start = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))

    def gradient(grads: torch.Generator) -> torch.Tensor:
        # in channels-last layout, as a convolution's weight gradient comes back
        g = 1e-3 * torch.randn(shape, dtype=dtype, generator=grads)
        return g.contiguous(memory_format=torch.channels_last)

    results = []
    for fused in (True, False):
        monkeypatch.setattr(loop, "_FUSED_ADAM", fused)
        param, grads = start.clone(), torch.Generator().manual_seed(1)
        adam = loop.Adam(param, lr=1e-2)
        for _ in range(50):
            adam.step(gradient(grads))
        results.append(param)
    reference = start.clone().requires_grad_(True)
    optimizer, grads = torch.optim.Adam([reference], lr=1e-2), torch.Generator().manual_seed(1)
    for _ in range(50):
        reference.grad = gradient(grads)
        optimizer.step()
    assert torch.equal(results[1], reference.detach())
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(results[0], results[1], rtol=2 * ulp, atol=2 * ulp)
    assert not torch.equal(results[0], start)


def test_small_layers_step_on_one_thread_and_the_setting_is_restored() -> None:
    from adaround.reconstruct.loop import SMALL_STEP, step_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with step_threads(torch.zeros(SMALL_STEP - 1)):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with step_threads(torch.zeros(SMALL_STEP)):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
