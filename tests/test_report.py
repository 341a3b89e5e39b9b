"""The per-layer report compares nearest and AdaRound on the same loss and says which."""

from __future__ import annotations

import logging

import torch
from tiny_models import tiny_resnet

import adaround
from adaround.config import QuantConfig


def test_report_measures_both_roundings_on_one_loss_and_gives_the_optimised_one(caplog) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(weight_bits=3, iters=60, lr=0.05, loss="quadratic")
    with caplog.at_level(logging.INFO, logger="adaround.api"):
        qmodel = adaround.quantize(tiny_resnet(), x, cfg)
    report = {r.name: r for r in qmodel.adaround_report}
    stem = report["stem"]  # conv -> (folded BN) -> relu
    assert stem.measured == "after activation"
    assert stem.objective_nearest is not None and stem.objective_adaround is not None
    # the loss optimised goes down for every layer; the one measured after the activation
    # is reported beside it, for both roundings, so a rise there is visible as such
    for result in report.values():
        assert result.objective_adaround <= result.objective_nearest * 1.001
    assert "stem (W3): loss after relu nearest" in caplog.text
    assert "optimised loss (quadratic, layer output) nearest" in caplog.text
    fc = report["fc"]
    assert fc.measured == "layer output"
