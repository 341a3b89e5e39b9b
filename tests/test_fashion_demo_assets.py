"""Tests for the built-in demo assets: the Fashion-MNIST loader and the FashionNet weights."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from adaround.data.fashion_mnist import DEFAULT_ROOT, ENV_VAR, load_fashion_mnist
from adaround.models.fashion_net import WEIGHTS_PATH, FashionNet, fashion_net


def _dataset_root() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def _require_dataset() -> None:
    if not (_dataset_root() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"Fashion-MNIST not found under {_dataset_root()}; "
            "run `apt-get install dataset-fashion-mnist` or set " + ENV_VAR
        )


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_weights_file_is_small() -> None:
    assert WEIGHTS_PATH.is_file()
    assert WEIGHTS_PATH.stat().st_size < 2 * 1024 * 1024


def test_pretrained_model_accuracy() -> None:
    _require_dataset()
    model = fashion_net()
    assert isinstance(model, FashionNet)
    assert not model.training
    x, y = load_fashion_mnist("test")
    x, y = x[:1000], y[:1000]
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85


def test_missing_weights_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adaround.models.fashion_net as fn

    monkeypatch.setattr(fn, "WEIGHTS_PATH", tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        fn.fashion_net()


def test_model_architecture() -> None:
    model = fashion_net(pretrained=False)
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 <= n_params <= 150_000
    assert any(isinstance(m, torch.nn.ReLU6) for m in model.modules())
    assert any(
        isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.modules()
    )
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_loader_shapes_and_dtypes() -> None:
    _require_dataset()
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.shape == (10000,)
    assert y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1.0) < 0.05


def test_loader_on_synthetic_files(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.array([0, 9, 4]))
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [0, 9, 4] and y.dtype == torch.int64


def test_corrupt_magic_raises_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    _write_idx(bad, 1234, np.zeros((2, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.array([1, 2]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_root_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path / "nope")


def test_env_var_sets_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        load_fashion_mnist("test")
