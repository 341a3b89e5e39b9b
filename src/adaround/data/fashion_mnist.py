"""Fashion-MNIST loader reading the idx files shipped by Debian's ``dataset-fashion-mnist``.

The files are parsed with :mod:`gzip` and :mod:`numpy` only; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEFAULT_ROOT",
    "ENV_VAR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_fashion_mnist",
]

logger = logging.getLogger(__name__)

#: Environment variable that overrides the dataset directory.
ENV_VAR = "ADAROUND_FASHION_MNIST"
#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Per-channel mean of the training images (pixels scaled to [0, 1]).
FASHION_MNIST_MEAN = 0.2860
#: Per-channel standard deviation of the training images (pixels scaled to [0, 1]).
FASHION_MNIST_STD = 0.3530

_IMAGES_MAGIC = 2051  # idx3, unsigned byte
_LABELS_MAGIC = 2049  # idx1, unsigned byte
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _resolve_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read a gzip-compressed idx file of unsigned bytes, checking its header."""
    with gzip.open(path, "rb") as fh:
        try:
            data = fh.read()
        except (OSError, EOFError) as exc:
            raise ValueError(f"corrupt idx file {path}: {exc}") from exc
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"corrupt idx file {path}: truncated header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"corrupt idx file {path}: magic number {found}, expected {magic}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(data) - header_len != expected:
        raise ValueError(
            f"corrupt idx file {path}: {len(data) - header_len} data bytes, "
            f"expected {expected} for shape {dims}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def load_fashion_mnist(
    split: str = "test", root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split as normalised tensors.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        root: Directory holding the four ``*-ubyte.gz`` files. Defaults to
            ``$ADAROUND_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``.

    Returns:
        ``(images, labels)``: float32 images of shape ``N x 1 x 28 x 28`` normalised with
        :data:`FASHION_MNIST_MEAN` / :data:`FASHION_MNIST_STD`, and int64 labels in ``[0, 10)``.

    Raises:
        ValueError: For an unknown split, or a corrupt or inconsistent idx file.
        FileNotFoundError: If the dataset files are not present.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    base = _resolve_root(root)
    prefix = _SPLIT_PREFIX[split]
    images_path = base / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = base / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [p for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(str(p) for p in missing)}. "
            f"Install them with `apt-get install dataset-fashion-mnist`, or set {ENV_VAR} "
            "to a directory containing the idx .gz files."
        )

    logger.debug("loading Fashion-MNIST %s split from %s", split, base)
    images = _read_idx(images_path, _IMAGES_MAGIC, ndim=3)
    labels = _read_idx(labels_path, _LABELS_MAGIC, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"corrupt idx file {labels_path}: {labels.shape[0]} labels for "
            f"{images.shape[0]} images in {images_path}"
        )
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"corrupt idx file {labels_path}: label {int(labels.max())} out of range")

    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    y = torch.from_numpy(labels.astype(np.int64))
    logger.info("loaded Fashion-MNIST %s: %d images", split, x.shape[0])
    return x, y
