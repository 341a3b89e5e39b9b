import logging

import pytest
import torch
from tiny_models import images
from torch import nn

import adaround
from adaround import QuantConfig, QuantLayer
from adaround.errors import ConfigError
from adaround.reconstruct import batched


def _net() -> nn.Module:
    """Four same-shaped convs (one stack), a depthwise pair (another) and a head."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()]
    layers += [nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(),
               nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(), nn.Flatten(),
               nn.Linear(6 * 8 * 8, 3)]
    return nn.Sequential(*layers).double()


def _codes(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.codes for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}


def test_float_inputs_round_same_shaped_layers_in_one_loop_with_the_codes_of_each_alone(
        monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    model, x = _net(), images(64).double()
    cfg = QuantConfig(weight_bits=3, iters=300, batch_size=16, lr=1e-2, inputs="float",
                      early_stop=False)
    with caplog.at_level(logging.INFO, logger="adaround"):
        together = adaround.quantize(model, x, cfg)
    sizes = {r.name: r.batched for r in together.adaround_report}
    assert sizes["2"] == sizes["8"] == 4 and sizes["10"] == sizes["12"] == 2, sizes
    assert "in one loop with 3 like it" in caplog.text
    monkeypatch.setattr(batched, "stack_key", id)  # every layer its own loop
    alone = adaround.quantize(model, x, cfg)
    assert {r.batched for r in alone.adaround_report} == {1}
    nearest = adaround.quantize(model, x, QuantConfig(weight_bits=3, rounding="nearest"))
    for name, codes in _codes(together).items():
        assert torch.equal(codes, _codes(alone)[name]), name
    assert any(not torch.equal(c, _codes(nearest)[n]) for n, c in _codes(together).items())
    assert [r.name for r in together.adaround_report] == [r.name for r in alone.adaround_report]


def test_float_inputs_reconstruct_from_the_fp_network() -> None:
    """With FP inputs a layer's codes do not depend on how earlier layers were rounded."""
    model, x = _net(), images(64).double()
    cfg = dict(weight_bits=3, iters=100, batch_size=16, inputs="float")
    everything = adaround.quantize(model, x, QuantConfig(**cfg))
    last_only = adaround.quantize(model, x, QuantConfig(include=("15",), **cfg))
    eq25 = adaround.quantize(model, x, QuantConfig(**{**cfg, "inputs": "quantized"}))
    assert torch.equal(_codes(everything)["15"], _codes(last_only)["15"])
    assert not all(torch.equal(_codes(everything)[n], c) for n, c in _codes(eq25).items())


def test_inputs_option_is_validated() -> None:
    with pytest.raises(ConfigError, match="inputs='fp'.*quantized, float"):
        QuantConfig(inputs="fp")
