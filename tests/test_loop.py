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


def test_steps_run_on_one_thread_and_large_products_on_all() -> None:
    from adaround.reconstruct.loop import PARALLEL_PRODUCT, quadratic_gradient, step_threads

    seen = []

    def spy(t: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return t

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with step_threads(torch.device("cpu")) as threads:
            assert threads == 2 and torch.get_num_threads() == 1
            for rows, d in ((4, 64), (64, 576)):  # below and above PARALLEL_PRODUCT
                assert (rows * d * d >= PARALLEL_PRODUCT) == (rows == 64)
                a, r = torch.eye(d).unsqueeze(0), torch.zeros(1, rows, d)
                grad = quadratic_gradient(a, r, r, spy, precision="float32", threads=threads)
                hs = torch.ones(1, rows, d)
                torch.testing.assert_close(grad(hs), 2 * hs)
                assert torch.get_num_threads() == 1  # back for the element-wise kernels
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _psd(d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(4 * d, d, generator=gen)
    return (x.T @ x / (4 * d)).unsqueeze(0)


def test_delta_gradient_is_exact_at_each_refresh_and_close_between() -> None:
    from adaround.reconstruct.loop import REFRESH, DeltaGradient

    gen = torch.Generator().manual_seed(0)
    d, rows = 64, 8
    a, r0 = _psd(d, gen), torch.randn(1, rows, d, generator=gen)
    out = torch.empty(1, rows, d)
    def exact(hs: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(r0, hs.view(1, rows, d), a, beta=2, alpha=2, out=out)

    grad = DeltaGradient(exact, a, lambda t: t.view(1, rows, d), out)
    hs = 0.01 * torch.rand(rows, d, generator=gen)
    worst = 0.0
    for step in range(2 * REFRESH + 1):
        exact = torch.baddbmm(r0, hs.view(1, rows, d), a, beta=2, alpha=2)
        got = grad(hs)
        if step % REFRESH == 0:
            assert torch.equal(got, exact)  # the float32 product itself
        else:  # the error: a few bfloat16 roundings of the change's product, not of the whole
            change = 2 * (hs - grad.hs_ref).view(1, rows, d) @ a
            worst = max(worst, ((got - exact).abs().max() / change.abs().max()).item())
        hs = (hs + 1e-4 * torch.randn(rows, d, generator=gen)).clamp(0, 0.01)
    assert 0 < worst < 2e-2


def test_bfloat16_steps_round_like_float32_ones() -> None:
    from adaround.reconstruct.loop import Objective, QuadraticLoss, run_rounding
    from adaround.reconstruct.quadratic import accumulate_moments

    torch.manual_seed(0)
    layer = nn.Conv2d(8, 16, 3, padding=1)
    qlayer = QuantLayer(layer, bits=4, symmetric=True, per_channel=False)
    qlayer.fit_grid("mse")
    x = torch.randn(64, 8, 8, 8)
    moments = accumulate_moments(layer, [(x + 0.1 * torch.randn_like(x), x)])
    codes = {}
    for precision in ("float32", "bfloat16"):
        cfg = QuantConfig(iters=400, lr=1e-2, early_stop=False, step_precision=precision)
        codes[precision], _ = run_rounding(qlayer, Objective(QuadraticLoss(qlayer, moments)), cfg)
    assert not torch.equal(codes["float32"], qlayer.nearest_codes())  # it learned something
    assert (codes["float32"] != codes["bfloat16"]).float().mean() < 0.01


def test_bfloat16_steps_only_where_they_pay(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from adaround.reconstruct import loop

    big, small = torch.zeros(1, 576, 576), torch.zeros(1, 288, 288)
    monkeypatch.setattr(loop, "cpu_has_bf16_units", lambda: True)
    assert loop.bf16_steps(big, "auto") and not loop.bf16_steps(small, "auto")
    assert not loop.bf16_steps(big, "float32") and loop.bf16_steps(small, "bfloat16")
    monkeypatch.setattr(loop, "cpu_has_bf16_units", lambda: False)
    assert not loop.bf16_steps(big, "auto")
    with pytest.raises(adaround.ConfigError, match="step_precision"):
        QuantConfig(step_precision="float16")


def test_channels_last_weights_round_as_contiguous_ones() -> None:
    from adaround.reconstruct.loop import Objective, QuadraticLoss, run_rounding
    from adaround.reconstruct.quadratic import accumulate_moments

    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(32, 4, 6, 6)
    moments = accumulate_moments(layer, [(x + 0.1 * torch.randn_like(x), x)])
    cfg = QuantConfig(iters=200, lr=1e-2, early_stop=False)
    codes = []
    for layout in (torch.contiguous_format, torch.channels_last):
        layer.weight.data = layer.weight.data.contiguous(memory_format=layout)
        qlayer = QuantLayer(layer, bits=4, symmetric=True, per_channel=True)
        qlayer.fit_grid("mse")
        codes.append(run_rounding(qlayer, Objective(QuadraticLoss(qlayer, moments)), cfg)[0])
    assert torch.equal(codes[0], codes[1])


def test_denormals_are_flushed_during_the_steps_only() -> None:
    from adaround.reconstruct import loop

    assert not loop.denormals_flushed()
    seen = []
    real = loop._round_weights

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(loop.denormals_flushed())
        return real(*args, **kwargs)

    model, x = _toy()
    try:
        loop._round_weights = spy
        adaround.quantize(model, x, QuantConfig(iters=20, loss="quadratic"))
    finally:
        loop._round_weights = real
    assert seen and all(seen)  # inside the loop where this CPU can flush them
    assert not loop.denormals_flushed()  # and the caller's setting back afterwards


@pytest.mark.parametrize("total", [40, 256, 700, 1024, 5000])
def test_eval_rows_are_spread_and_shared_by_processes_without_overlap(total: int) -> None:
    from adaround.reconstruct.loop import EVAL_SAMPLES, eval_rows

    one = eval_rows(total, 0, total)
    assert len(one) == min(total, EVAL_SAMPLES) and len(set(one.tolist())) == len(one)
    if total > EVAL_SAMPLES:  # spread over the whole set, not its first samples
        assert one[-1] >= total - total / EVAL_SAMPLES - 1
    for processes in (2, 3):
        bounds = [total * r // processes for r in range(processes + 1)]
        parts = [eval_rows(total, lo, hi - lo) + lo for lo, hi in zip(bounds, bounds[1:])]
        assert torch.equal(torch.cat(parts), one)
