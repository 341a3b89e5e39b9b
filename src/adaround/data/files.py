"""Loading datasets from files: arrays (``.npz``/``.npy``/``.pt``) and folders of images.

Everything returns ``(x, y)`` tensors ready for a model: images as float32 NCHW, optionally
normalised per channel, and labels as int64 (or ``None`` when the data carries none).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "data_root",
    "imagenet_sample_split",
    "list_image_files",
    "load_array_file",
    "load_image_folder",
    "load_images",
    "normalize",
    "split_image_files",
]

logger = logging.getLogger(__name__)

#: Image file extensions read by :func:`load_image_folder` (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
#: (images, labels) key pairs accepted in ``.npz`` files and ``.pt`` dicts, in order of preference.
_ARRAY_KEYS = (("x", "y"), ("images", "labels"), ("data", "targets"))
_WNID = re.compile(r"^(n\d{8})_")

Norm = float | Sequence[float] | None


# --------------------------------------------------------------------------------------------
# data root
# --------------------------------------------------------------------------------------------


def data_root() -> Path:
    """Directory with the shared benchmark data.

    ``$ADAROUND_DATA`` if set; otherwise the first existing of ``<repo>/../shared/data`` (the repo
    root found from this file's location) and ``<cwd>/../shared/data``. If none exists, the
    repo-relative path is returned so that callers can report where the data was expected.
    """
    env = os.environ.get("ADAROUND_DATA")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[3]
    candidates = [repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[0]


# --------------------------------------------------------------------------------------------
# array files
# --------------------------------------------------------------------------------------------


def _pick_keys(keys: Sequence[Any], path: Path) -> tuple[Any, Any | None]:
    """The (x, y) keys to read; y is ``None`` when the file has no labels."""
    for x_key, y_key in _ARRAY_KEYS:
        if x_key in keys:
            return x_key, (y_key if y_key in keys else None)
    accepted = ", ".join(f"'{x}' (+ optional '{y}')" for x, y in _ARRAY_KEYS)
    found = ", ".join(repr(k) for k in keys) or "(none)"
    raise ValueError(
        f"{path}: no image array found; expected one of {accepted}; keys found: {found}"
    )


def _pick_xy(container: Mapping[Any, Any], path: Path) -> tuple[Any, Any | None]:
    x_key, y_key = _pick_keys(list(container), path)
    return container[x_key], (None if y_key is None else container[y_key])


def _read_array_file(path: Path) -> tuple[Any, Any | None]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            npz = np.load(path, allow_pickle=False)
        except Exception as err:
            raise ValueError(f"cannot read {path} as .npz: {err}") from err
        with npz:
            x_key, y_key = _pick_keys(npz.files, path)
            try:
                return npz[x_key], (None if y_key is None else npz[y_key])
            except Exception as err:
                raise ValueError(f"cannot read {path} as .npz: {err}") from err
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False), None
        except Exception as err:
            raise ValueError(f"cannot read {path} as .npy: {err}") from err
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"cannot read {path} with torch.load(weights_only=True): {err}. Save a tensor, a "
                "dict {'x': tensor, 'y': tensor} or a tuple (x, y) of tensors."
            ) from err
        if isinstance(obj, Mapping):
            return _pick_xy(obj, path)
        if isinstance(obj, (tuple, list)) and len(obj) in (1, 2):
            return obj[0], (obj[1] if len(obj) == 2 else None)
        if isinstance(obj, Tensor):
            return obj, None
        raise ValueError(
            f"{path} holds a {type(obj).__name__}; expected a tensor, a dict with 'x' (and 'y') "
            "or a tuple (x, y)"
        )
    raise ValueError(
        f"unsupported data file extension {path.suffix!r} for {path}; "
        "use .npz (keys x, y), .npy, .pt or .pth, or a folder of images"
    )


def _as_tensor(a: Any, what: str, path: Path) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().cpu()
    try:
        arr = np.asarray(a)
        return torch.from_numpy(np.ascontiguousarray(arr))
    except Exception as err:
        raise ValueError(f"{path}: {what} is not a numeric array ({type(a).__name__})") from err


def _uint8_to_float_nchw(x: Tensor, path: Path) -> Tensor:
    if x.ndim == 4 and x.shape[-1] in (1, 3):  # NHWC
        x = x.permute(0, 3, 1, 2)
    elif x.ndim == 4 and x.shape[1] in (1, 3):  # already NCHW
        pass
    elif x.ndim == 3:  # NHW grey
        x = x.unsqueeze(1)
    else:
        raise ValueError(
            f"{path}: uint8 data of shape {tuple(x.shape)} is not an image batch; expected NHWC "
            "with 1 or 3 channels (or NCHW / NHW)"
        )
    return x.contiguous().float().div_(255.0)


def _channel_stats(value: float | Sequence[float], channels: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values but the data has {channels} channels")
    return t


def normalize(x: Tensor, mean: Norm = None, std: Norm = None) -> Tensor:
    """``(x - mean) / std`` per channel (dim 1); returns ``x`` itself when both are ``None``."""
    if mean is None and std is None:
        return x
    if x.ndim < 2:
        raise ValueError(f"per-channel mean/std need data with a channel dim, got {tuple(x.shape)}")
    c = x.shape[1]
    view = (1, c) + (1,) * (x.ndim - 2)
    if mean is not None:
        x = x - _channel_stats(mean, c, "mean").to(x.dtype).view(view)
    if std is not None:
        s = _channel_stats(std, c, "std")
        if (s <= 0).any():
            raise ValueError(f"std must be positive, got {s.tolist()}")
        x = x / s.to(x.dtype).view(view)
    return x


def _check_slice(limit: int | None, offset: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")


def load_array_file(
    path: str | Path,
    mean: Norm = None,
    std: Norm = None,
    limit: int | None = None,
    offset: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Load ``(x, y)`` from a ``.npz``, ``.npy``, ``.pt`` or ``.pth`` file.

    * ``.npz``: arrays ``x`` and optional ``y`` (also ``images``/``labels``, ``data``/``targets``).
    * ``.pt``/``.pth``: a tensor, a dict with those keys, or a tuple ``(x, y)`` (read with
      ``weights_only=True``).
    * ``.npy``: a single array ``x``.

    uint8 images in NHWC (last dim 1 or 3) become float32 NCHW in [0, 1] (uint8 NCHW / NHW are
    accepted too). Float arrays are kept as they are, cast to float32; other dtypes (e.g. token
    ids) are returned unchanged. ``mean``/``std`` (one value per channel, or a scalar) then
    normalise floats along dim 1. Rows ``offset:offset+limit`` are kept. Integer labels are
    returned as int64.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown extension, no image key (the keys found are listed), unreadable,
            empty data, NaN/Inf values, or labels whose length differs from ``x``.
    """
    path = Path(path)
    _check_slice(limit, offset)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    x_raw, y_raw = _read_array_file(path)
    x = _as_tensor(x_raw, "x", path)
    y = None if y_raw is None else _as_tensor(y_raw, "y", path)

    if x.ndim == 0 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{path}: the data array is empty (shape {tuple(x.shape)})")
    if y is not None:
        if y.ndim == 0:
            raise ValueError(f"{path}: labels are a scalar, expected one label per sample")
        if y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{path}: {y.shape[0]} labels for {x.shape[0]} samples; x and y must have the "
                "same length"
            )

    n = x.shape[0]
    stop = n if limit is None else min(n, offset + limit)
    if offset >= n or stop <= offset:
        raise ValueError(
            f"{path}: no samples selected (offset={offset}, limit={limit}, {n} samples in file)"
        )
    x = x[offset:stop]
    y = None if y is None else y[offset:stop]

    if x.dtype == torch.uint8:
        x = _uint8_to_float_nchw(x, path)
    elif x.dtype.is_floating_point:
        x = x.float()
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{path}: x contains {bad} NaN/Inf values")
    elif mean is not None or std is not None:
        raise ValueError(f"{path}: mean/std normalisation needs image data, x has dtype {x.dtype}")
    x = normalize(x, mean, std).contiguous()

    if y is not None:
        if y.dtype.is_floating_point:
            if not torch.isfinite(y).all():
                raise ValueError(f"{path}: y contains NaN/Inf values")
        elif y.dtype != torch.bool:
            y = y.long()
        y = y.contiguous()
    return x, y


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def list_image_files(
    path: str | Path, class_index: str | None = "wnid"
) -> tuple[list[Path], list[int] | None]:
    """Image files under ``path`` (sorted) and their labels, as :func:`load_image_folder` sees them.

    Images directly in ``path`` are sorted by file name; with ``class_index="wnid"`` and every
    name starting with a WordNet id (``n01440764_...``) the label is that id's index among the
    sorted ids present. Without top-level images, each sub-folder is a class: files are sorted by
    (sub-folder, name) and the label is the sorted sub-folder index. ``class_index=None``
    disables labels.
    """
    if class_index not in ("wnid", None, "none"):
        raise ValueError(f"class_index must be 'wnid' or None, got {class_index!r}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"not a folder of images: {root}")
    with_labels = class_index == "wnid"

    files = sorted((p for p in root.iterdir() if _is_image(p)), key=lambda p: p.name)
    if files:
        if not with_labels:
            return files, None
        ids = [_WNID.match(p.name) for p in files]
        if all(ids):
            wnids = [m.group(1) for m in ids]  # type: ignore[union-attr]
            index = {w: i for i, w in enumerate(sorted(set(wnids)))}
            return files, [index[w] for w in wnids]
        if any(ids):
            logger.warning(
                "%s: only %d of %d file names start with a WordNet id; returning no labels",
                root,
                sum(1 for m in ids if m),
                len(files),
            )
        return files, None

    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    labels: list[int] = []
    for label, d in enumerate(classes):
        members = sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name)
        files.extend(members)
        labels.extend([label] * len(members))
    if not files:
        raise ValueError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in {root} or its sub-folders")
    return files, (labels if with_labels else None)


def _load_one(path: Path, size: int, resize: int | None) -> Tensor:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if resize is not None:
                w, h = img.size
                short, long = (w, h) if w <= h else (h, w)
                if short != resize:
                    new_long = int(resize * long / short)
                    new_size = (resize, new_long) if w <= h else (new_long, resize)
                    img = img.resize(new_size, Image.BILINEAR)
            w, h = img.size
            if w < size or h < size:
                raise ValueError(
                    f"image {path} is {w}x{h}, smaller than the {size}x{size} crop; "
                    "pass resize >= size"
                )
            left = round((w - size) / 2.0)
            top = round((h - size) / 2.0)
            img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_images(
    files: Sequence[str | Path],
    size: int = 224,
    resize: int | None = 256,
    mean: Norm = None,
    std: Norm = None,
) -> Tensor:
    """Decode ``files`` into a float32 ``(N, 3, size, size)`` batch.

    Each image is converted to RGB, its short side resized to ``resize`` (bilinear, PIL; skipped
    when ``None``), centre-cropped to ``size``, scaled to [0, 1] and normalised with
    ``mean``/``std``. Raises ``ValueError`` naming an unreadable image.
    """
    if size <= 0 or (resize is not None and resize < size):
        raise ValueError(f"need 0 < size <= resize, got size={size}, resize={resize}")
    out = torch.empty((len(files), 3, size, size), dtype=torch.float32)
    for i, f in enumerate(files):
        out[i] = _load_one(Path(f), size, resize).float().div_(255.0)
    return normalize(out, mean, std)


def load_image_folder(
    path: str | Path,
    size: int = 224,
    resize: int | None = 256,
    mean: Norm = None,
    std: Norm = None,
    limit: int | None = None,
    offset: int = 0,
    class_index: str | None = "wnid",
) -> tuple[Tensor, Tensor | None]:
    """Load a folder of jpg/jpeg/png images as ``(x, y)``.

    Files and labels as in :func:`list_image_files`; files ``offset:offset+limit`` of the sorted
    list are decoded as in :func:`load_images`. ``y`` is int64 or ``None``.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: the folder holds no images, the selection is empty, or an image is
            unreadable (named in the message).
    """
    _check_slice(limit, offset)
    files, labels = list_image_files(path, class_index)
    stop = len(files) if limit is None else min(len(files), offset + limit)
    if offset >= stop:
        raise ValueError(
            f"{path}: no images selected (offset={offset}, limit={limit}, {len(files)} images)"
        )
    x = load_images(files[offset:stop], size=size, resize=resize, mean=mean, std=std)
    y = None if labels is None else torch.tensor(labels[offset:stop], dtype=torch.long)
    return x, y


def split_image_files(
    root: str | Path, n_calib: int = 200, seed: int = 0, n_eval: int | None = None
) -> tuple[list[Path], list[Path], list[int]]:
    """File-level split behind :func:`imagenet_sample_split`.

    Returns ``(calib_files, eval_files, eval_labels)``: the files are ordered by a seeded hash of
    their names (stable across platforms and library versions), the first ``n_calib`` go to
    calibration and the rest (or the next ``n_eval``) to evaluation; both lists are then sorted
    by file name. Labels are the WordNet-id index over *all* files in ``root``.
    """
    root = Path(root)
    files, labels = list_image_files(root, "wnid")
    if labels is None:
        raise ValueError(
            f"{root}: file names must start with a WordNet id (e.g. n01440764_tench.JPEG) to "
            "derive labels"
        )
    n = len(files)
    if not 0 <= n_calib < n:
        raise ValueError(f"n_calib must be in [0, {n}) for {n} images, got {n_calib}")
    if n_eval is not None and n_eval <= 0:
        raise ValueError(f"n_eval must be positive or None, got {n_eval}")

    def key(i: int) -> bytes:
        return hashlib.sha256(f"{seed}:{files[i].name}".encode()).digest()

    order = sorted(range(n), key=key)
    calib_idx = sorted(order[:n_calib])
    rest = order[n_calib:]
    eval_idx = sorted(rest if n_eval is None else rest[:n_eval])
    return (
        [files[i] for i in calib_idx],
        [files[i] for i in eval_idx],
        [labels[i] for i in eval_idx],
    )


def imagenet_sample_split(
    root: str | Path,
    n_calib: int = 200,
    seed: int = 0,
    *,
    n_eval: int | None = None,
    size: int = 224,
    resize: int | None = 256,
    mean: Norm = None,
    std: Norm = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Split the ImageNet sample into disjoint calibration and evaluation parts.

    ``root`` is the ``imagenet-sample`` folder (or the data root that contains it). The split is
    that of :func:`split_image_files` (by default 200 calibration and 800 evaluation images of
    the 1000); labels are the standard ImageNet index. Images are decoded as in
    :func:`load_images` (pass ``mean``/``std`` of the model, e.g. 0.5/0.5 for
    EfficientNet-Lite). With ``n_calib=0`` ``x_calib`` is an empty ``(0, 3, size, size)`` batch.

    Returns:
        ``(x_calib, x_eval, y_eval)``.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"ImageNet sample folder not found: {root}")
    if (root / "imagenet-sample").is_dir() and not any(_is_image(p) for p in root.iterdir()):
        root = root / "imagenet-sample"
    calib_files, eval_files, eval_labels = split_image_files(root, n_calib, seed, n_eval)
    x_calib = load_images(calib_files, size=size, resize=resize, mean=mean, std=std)
    x_eval = load_images(eval_files, size=size, resize=resize, mean=mean, std=std)
    y_eval = torch.tensor(eval_labels, dtype=torch.long)
    logger.info(
        "ImageNet sample split of %s (seed %d): %d calibration, %d evaluation images",
        root,
        seed,
        len(calib_files),
        len(eval_files),
    )
    return x_calib, x_eval, y_eval
