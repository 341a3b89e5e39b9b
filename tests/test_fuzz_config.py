"""Fuzz: bad options and wrong argument types, refused at construction or at the call."""

from __future__ import annotations

import math

import pytest
import torch
from fuzz_helpers import refused
from tiny_models import images, tiny_resnet

import adaround
from adaround import ConfigError, ModelError, QuantConfig, SaveFileError
from adaround.config import SEED_MAX

BAD_OPTIONS = [
    ("lr", math.inf), ("lr", -math.inf), ("lr", math.nan), ("lr", 0.0), ("lr", "1e-3"),
    ("lr", True), ("reg_weight", math.inf), ("reg_weight", math.nan), ("reg_weight", -1.0),
    ("beta_start", math.inf), ("beta_end", math.nan), ("beta_end", -2.0),
    ("warm_start", math.nan), ("warm_start", math.inf), ("warm_start", -0.1),
    ("seed", 2**70), ("seed", SEED_MAX + 1), ("seed", -1), ("seed", 1.5), ("seed", "0"),
    ("seed", True), ("iters", 0), ("iters", -5), ("iters", 2.0), ("iters", None),
    ("batch_size", 0), ("weight_bits", "4"), ("weight_bits", None),
    ("memory_budget_mb", math.inf), ("memory_budget_mb", 0), ("memory_budget_mb", -1.0),
    ("act_lr", math.inf), ("rounding", None), ("rounding", ["adaround"]),
    ("include", [1]), ("per_channel", 1), ("version", 99),
]


@pytest.mark.parametrize("name, value", BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_bad_option_refused(name: str, value: object) -> None:
    refused(ConfigError, lambda: QuantConfig(**{name: value}), name)


@pytest.mark.parametrize("kwargs", [
    {"act_bits": 4, "act_percentile": math.nan}, {"act_bits": 4, "qdrop": math.inf},
    {"act_bits": 4, "qdrop": 1.5}, {"act_bits": 4, "act_lr": math.nan},
])
def test_bad_activation_option_refused(kwargs: dict) -> None:
    refused(ConfigError, lambda: QuantConfig(**kwargs))


@pytest.mark.parametrize("kwargs", [{"seed": SEED_MAX}, {"seed": 0}, {"reg_weight": 0.0},
                                    {"warm_start": 0.0}, {"lr": 1e-8}])
def test_edge_values_accepted(kwargs: dict) -> None:
    QuantConfig(**kwargs)


@pytest.fixture(scope="module")
def quantized() -> torch.nn.Module:
    return adaround.quantize(tiny_resnet(), images(32), QuantConfig(rounding="nearest"))


def _model() -> torch.nn.Module:
    return tiny_resnet()


@pytest.mark.parametrize("case", [
    ("model dict", lambda q: adaround.quantize({}, images(32)), ModelError, "state dict"),
    ("model None", lambda q: adaround.quantize(None, images(32)), ModelError, "None"),
    ("config dict", lambda q: adaround.quantize(_model(), images(32), {"iters": 5}),
     ConfigError, "from_dict"),
    ("config str", lambda q: adaround.quantize(_model(), images(32), "w4"), ConfigError,
     "QuantConfig"),
    ("save None model", lambda q: adaround.save(None, "x.pt"), ModelError, "qmodel"),
    ("save None path", lambda q: adaround.save(q, None), ConfigError, "path"),
    ("save dict path", lambda q: adaround.save(q, {}), ConfigError, "path"),
    ("save float model", lambda q: adaround.save(_model(), "x.pt"), SaveFileError, "quantize"),
    ("load None path", lambda q: adaround.load(None, _model()), ConfigError, "path"),
    ("load int path", lambda q: adaround.load(3, _model()), ConfigError, "path"),
    ("load None model", lambda q: adaround.load("x.pt", None), ModelError, "model"),
    ("load dict model", lambda q: adaround.load("x.pt", {}), ModelError, "state dict"),
], ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_wrong_argument_types(case, quantized, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    _, call, cls, word = case
    refused(cls, lambda: call(quantized), word)
