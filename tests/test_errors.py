"""Bad input gets an error that names the problem and the fix."""

import math

import pytest
import torch
from tiny_models import images, tiny_resnet
from torch import nn

import adaround
from adaround import CalibrationDataError, ConfigError, ModelError, QuantConfig


@pytest.mark.parametrize("bits", [1, 9, 0, -4])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ConfigError, match=rf"weight_bits={bits} is out of range.*between 2 and 8"):
        QuantConfig(weight_bits=bits)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"rounding": "stochastic"}, "choose one of adaround, nearest"),
    ({"scale_method": "percentile"}, "choose one of mse, minmax"),
    ({"iters": 0}, "iters=0 is out of range"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"beta_start": 2.0, "beta_end": 20.0}, "swap the two values"),
    ({"warm_start": 1.0}, r"warm_start=1.0 must be in \[0, 1\)"),
    ({"lr": math.nan}, "lr=nan"),
    ({"per_channel": "yes"}, "per_channel must be True or False"),
])
def test_invalid_options(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        QuantConfig(**kwargs)


def test_unknown_option_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown option.*bitz.*known options:.*weight_bits"):
        QuantConfig.from_dict({"bitz": 4})


def test_config_round_trips_through_dict() -> None:
    cfg = QuantConfig(weight_bits=3, include=("a.*",), first_last_bits=8)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_empty_calibration_data() -> None:
    with pytest.raises(CalibrationDataError, match="empty"):
        adaround.quantize(tiny_resnet(), [], QuantConfig())
    with pytest.raises(CalibrationDataError, match="empty"):
        adaround.quantize(tiny_resnet(), torch.empty(0, 3, 8, 8), QuantConfig())


def test_too_little_calibration_data() -> None:
    with pytest.raises(CalibrationDataError, match="8 samples, fewer than batch_size=32"):
        adaround.quantize(tiny_resnet(), images(8), QuantConfig())


def test_nan_in_calibration_data() -> None:
    x = images(64)
    x[3, 0, 0, 0] = math.nan
    x[5, 1, 1, 1] = math.inf
    with pytest.raises(CalibrationDataError, match="2 NaN/Inf values"):
        adaround.quantize(tiny_resnet(), x, QuantConfig())


def test_nan_in_weights() -> None:
    model = tiny_resnet()
    with torch.no_grad():
        model.block.conv1.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(ModelError, match="block.conv1.weight holds NaN/Inf"):
        adaround.quantize(model, images(64), QuantConfig())


def test_input_shape_the_model_rejects() -> None:
    pattern = r"rejected calibration inputs of shape \(\d+, 5, 8, 8\)"
    with pytest.raises(CalibrationDataError, match=pattern):
        adaround.quantize(tiny_resnet(), torch.randn(64, 5, 8, 8), QuantConfig())


def test_unsupported_calibration_type() -> None:
    with pytest.raises(CalibrationDataError, match="not supported"):
        adaround.quantize(tiny_resnet(), "images/", QuantConfig())
    with pytest.raises(CalibrationDataError, match="disagree in shape"):
        adaround.quantize(tiny_resnet(), [images(4), torch.randn(4, 3, 9, 9)], QuantConfig())


def test_model_without_quantizable_layer() -> None:
    with pytest.raises(ModelError, match="no quantizable layer"):
        adaround.quantize(nn.Sequential(nn.ReLU()), torch.randn(64, 3), QuantConfig())


def test_model_is_left_in_training_mode_when_it_was() -> None:
    model = tiny_resnet().train()
    adaround.quantize(model, images(8), QuantConfig(rounding="nearest"))
    assert model.training
