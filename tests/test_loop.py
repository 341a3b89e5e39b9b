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
    stop, binary, soft = EarlyStop(), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5])
    said = [stop.update(step, soft if step == soft_step else binary) for step in range(300)]
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
