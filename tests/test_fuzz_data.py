"""Fuzz: calibration and evaluation data, and models that produce NaN/Inf.

Each case ends in the error class with a message naming the fix, a warning that says what
differs, or the correct result."""

from __future__ import annotations

import logging

import pytest
import torch
from fuzz_helpers import assert_fix, refused
from tiny_models import images, tiny_resnet
from torch import nn

import adaround
from adaround import CalibrationDataError, ConfigError, QuantConfig
from adaround.errors import EvaluationError, NumericalError
from adaround.evaluate import accuracy
from adaround.input_stats import KEY, differences

FAST = QuantConfig(iters=4, lr=0.5, batch_size=16)


@pytest.mark.parametrize("scale", [1e13, 1e20, 1e25, 1e30])
def test_huge_calibration_values_refused_before_work(scale: float) -> None:
    refused(CalibrationDataError, lambda: adaround.quantize(tiny_resnet(), images(32) * scale,
                                                            FAST), "normalize")


def test_large_but_sane_values_run() -> None:
    q = adaround.quantize(tiny_resnet(), images(32) * 255, FAST)
    assert torch.isfinite(q(images(4) * 255)).all()


class NaNInside(nn.Module):
    """log of a signed activation: NaN after the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.log(self.conv1(x))
        return self.fc(self.conv2(x).flatten(1))


@pytest.mark.parametrize("kwargs", [{}, {"loss": "sampled"}, {"act_bits": 8, "method": "qdrop"}])
def test_nan_inside_the_model_stops_naming_the_layer(kwargs: dict) -> None:
    torch.manual_seed(0)
    cfg = QuantConfig(iters=4, lr=0.5, batch_size=16, **kwargs)
    with pytest.raises(NumericalError) as info:
        adaround.quantize(NaNInside(), images(32), cfg)
    assert_fix(info.value, NumericalError, "conv2", "NaN")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, str]:  # type: ignore[no-untyped-def]
    path = str(tmp_path_factory.mktemp("q") / "q.pt")
    adaround.save(adaround.quantize(tiny_resnet(), images(64), FAST), path)
    return adaround.load(path, tiny_resnet()), path


@pytest.mark.parametrize("labels", [torch.full((16,), 4), torch.full((16,), -1),
                                    torch.arange(16) * 100])
def test_labels_out_of_range_refused(saved, labels: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    refused(EvaluationError, lambda: accuracy(saved[0], images(16), labels), "labels")


def test_inputs_the_model_rejects_are_an_evaluation_error(saved) -> None:  # type: ignore[no-untyped-def]
    refused(EvaluationError, lambda: accuracy(saved[0], torch.randn(8, 1, 8, 8),
                                              torch.zeros(8)), "shape")


@pytest.mark.parametrize("transform, word", [
    (lambda x: x * 60 + 128, "span"),                   # raw pixels, no normalization
    (lambda x: x * 0.2 + 3.0, "per-channel mean"),      # another mean/std
    (lambda x: torch.nn.functional.interpolate(x, size=12), "shape"),  # another resolution
    (lambda x: x[:, :1], "channels"),                   # grayscale on an RGB model
])
def test_inputs_unlike_calibration_warn(saved, caplog, transform, word: str) -> None:  # type: ignore[no-untyped-def]
    x = transform(images(32, seed=7))
    with caplog.at_level(logging.WARNING, logger="adaround"):
        found = adaround.input_stats.warn_if_unlike(saved[0], x)
    assert found and any(word in f for f in found)
    assert "preprocessed the same way" in caplog.text


def test_inputs_like_calibration_do_not_warn(saved) -> None:  # type: ignore[no-untyped-def]
    assert differences(saved[0].adaround_meta[KEY], images(64, seed=9)) == []


def test_files_without_statistics_still_load_and_evaluate(saved, caplog, tmp_path) -> None:  # type: ignore[no-untyped-def]
    qmodel = saved[0]
    qmodel.adaround_meta = {k: v for k, v in qmodel.adaround_meta.items() if k != KEY}
    path = tmp_path / "old.pt"
    adaround.save(qmodel, path)
    loaded = adaround.load(path, tiny_resnet())
    with caplog.at_level(logging.WARNING, logger="adaround"):
        accuracy(loaded, images(16) * 100, torch.zeros(16))
    assert "unlike" not in caplog.text


def test_hf_all_zero_attention_masks_refused() -> None:
    from adaround.hf.data import calibration_batches

    batch = {"input_ids": torch.randint(0, 50, (4, 6)),
             "attention_mask": torch.zeros(4, 6, dtype=torch.long)}
    refused(CalibrationDataError, lambda: calibration_batches(batch), "attention_mask")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_hf_cuda_without_cuda_refused(device: str) -> None:
    from adaround.hf import HFOptions

    refused(ConfigError, lambda: HFOptions(device=device), "CUDA")


def test_hf_unknown_device_refused() -> None:
    from adaround.hf import HFOptions

    refused(ConfigError, lambda: HFOptions(device="gpu0"), "device")
