"""Tests of adaround.data.files on tiny data written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaround.data.files import (
    data_root,
    imagenet_sample_split,
    list_image_files,
    load_array_file,
    load_image_folder,
    split_image_files,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _nhwc(n: int = 4, h: int = 5, w: int = 6, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


# ------------------------------------------------------------------------------------------
# load_array_file
# ------------------------------------------------------------------------------------------


def test_npz_uint8_nhwc_becomes_float_nchw(tmp_path: Path) -> None:
    x = _nhwc()
    y = np.array([3, 1, 4, 1], dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    xt, yt = load_array_file(tmp_path / "d.npz")
    assert xt.shape == (4, 3, 5, 6) and xt.dtype == torch.float32
    assert yt is not None and yt.dtype == torch.int64 and yt.tolist() == [3, 1, 4, 1]
    expected = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(xt, expected)
    assert float(xt.min()) >= 0.0 and float(xt.max()) <= 1.0
    assert xt[2, 1, 3, 4].item() == pytest.approx(x[2, 3, 4, 1] / 255)


def test_npz_normalisation_values(tmp_path: Path) -> None:
    x = _nhwc()
    np.savez(tmp_path / "d.npz", x=x)
    xt, yt = load_array_file(tmp_path / "d.npz", mean=MEAN, std=STD)
    assert yt is None
    for c in range(3):
        expected = (x[1, 2, 3, c] / 255 - MEAN[c]) / STD[c]
        assert xt[1, c, 2, 3].item() == pytest.approx(expected, abs=1e-6)
    # a scalar mean/std applies to every channel
    xs, _ = load_array_file(tmp_path / "d.npz", mean=0.5, std=0.5)
    torch.testing.assert_close(xs, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 * 2 - 1)


def test_grey_nhwc_and_limit_offset(tmp_path: Path) -> None:
    x = _nhwc(n=6, c=1)
    np.savez(tmp_path / "g.npz", images=x, labels=np.arange(6))
    xt, yt = load_array_file(tmp_path / "g.npz", limit=2, offset=3)
    assert xt.shape == (2, 1, 5, 6)
    assert yt is not None and yt.tolist() == [3, 4]
    assert xt[0, 0, 1, 2].item() == pytest.approx(x[3, 1, 2, 0] / 255)
    # limit beyond the end is clipped
    xt, yt = load_array_file(tmp_path / "g.npz", limit=100, offset=5)
    assert len(xt) == 1 and yt is not None and yt.tolist() == [5]


def test_float_arrays_kept_and_other_containers(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(3, 2, 4, 4))  # float64, already NCHW
    np.savez(tmp_path / "f.npz", data=x, targets=np.array([0, 1, 0]))
    xt, yt = load_array_file(tmp_path / "f.npz")
    assert xt.dtype == torch.float32 and xt.shape == (3, 2, 4, 4)
    torch.testing.assert_close(xt, torch.from_numpy(x).float())
    assert yt is not None and yt.tolist() == [0, 1, 0]

    xn, yn = load_array_file(tmp_path / "f.npz", mean=(1.0, -1.0), std=(2.0, 0.5))
    torch.testing.assert_close(xn[:, 0], (xt[:, 0] - 1.0) / 2.0)
    torch.testing.assert_close(xn[:, 1], (xt[:, 1] + 1.0) / 0.5)

    np.save(tmp_path / "a.npy", _nhwc(n=2))
    xa, ya = load_array_file(tmp_path / "a.npy")
    assert xa.shape == (2, 3, 5, 6) and ya is None

    t = torch.rand(5, 3, 8, 8)
    labels = torch.arange(5)
    torch.save(t, tmp_path / "t.pt")
    torch.save({"x": t, "y": labels}, tmp_path / "d.pth")
    torch.save((t, labels), tmp_path / "tup.pt")
    xt, yt = load_array_file(tmp_path / "t.pt")
    assert torch.equal(xt, t) and yt is None
    for name in ("d.pth", "tup.pt"):
        xt, yt = load_array_file(tmp_path / name)
        assert torch.equal(xt, t) and yt is not None and torch.equal(yt, labels)


def test_array_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_array_file(tmp_path / "nope.npz")

    (tmp_path / "d.csv").write_text("1,2,3\n")
    with pytest.raises(ValueError, match=r"unsupported data file extension '\.csv'"):
        load_array_file(tmp_path / "d.csv")

    np.savez(tmp_path / "k.npz", pixels=_nhwc(), classes=np.zeros(4))
    with pytest.raises(ValueError, match="keys found: 'pixels', 'classes'"):
        load_array_file(tmp_path / "k.npz")

    np.savez(tmp_path / "e.npz", x=np.zeros((0, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        load_array_file(tmp_path / "e.npz")

    bad = np.ones((2, 3, 4, 4), dtype=np.float32)
    bad[1, 2, 0, 0] = np.nan
    bad[0, 0, 1, 1] = np.inf
    np.savez(tmp_path / "nan.npz", x=bad)
    with pytest.raises(ValueError, match="2 NaN/Inf"):
        load_array_file(tmp_path / "nan.npz")

    np.savez(tmp_path / "len.npz", x=_nhwc(n=4), y=np.arange(3))
    with pytest.raises(ValueError, match="3 labels for 4 samples"):
        load_array_file(tmp_path / "len.npz")

    np.savez(tmp_path / "ok.npz", x=_nhwc(n=4))
    with pytest.raises(ValueError, match="no samples selected"):
        load_array_file(tmp_path / "ok.npz", offset=4)
    with pytest.raises(ValueError, match="3 values but the data has 3 channels|4 values"):
        load_array_file(tmp_path / "ok.npz", mean=(0.1, 0.2, 0.3, 0.4))

    (tmp_path / "junk.pt").write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load_array_file(tmp_path / "junk.pt")


# ------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------


def _colour(i: int) -> tuple[int, int, int]:
    return (10 * i % 256, 255 - 10 * i % 256, (37 * i) % 256)


def _write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _image_index(img: torch.Tensor, n: int) -> int:
    """Which _colour(i) a solid-colour image shows."""
    rgb = tuple(round(v) for v in (img[:, 0, 0] * 255).tolist())
    return [_colour(i) for i in range(n)].index(rgb)


def test_image_folder_wnid_labels_and_shapes(tmp_path: Path) -> None:
    _write_png(tmp_path / "n00000002_zebra.png", _colour(0))
    _write_png(tmp_path / "n00000001_apple.png", _colour(1), size=(30, 40))
    _write_png(tmp_path / "n00000003_cat.PNG", _colour(2))
    _write_png(tmp_path / "n00000001_bee.png", _colour(3))
    (tmp_path / "notes.txt").write_text("not an image")

    x, y = load_image_folder(tmp_path, size=16, resize=20)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    # sorted by file name: apple, bee, zebra, cat -> wnid indices 0, 0, 1, 2
    assert y is not None and y.dtype == torch.int64 and y.tolist() == [0, 0, 1, 2]
    assert [_image_index(img, 4) for img in x] == [1, 3, 0, 2]
    # a solid colour survives resize and crop exactly
    torch.testing.assert_close(x[0, :, 5, 7], torch.tensor(_colour(1)) / 255.0)

    xn, _ = load_image_folder(tmp_path, size=16, resize=20, mean=MEAN, std=STD)
    torch.testing.assert_close(
        xn, (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    )

    xs, ys = load_image_folder(tmp_path, size=16, resize=20, limit=2, offset=1)
    assert ys is not None and ys.tolist() == [0, 1]
    torch.testing.assert_close(xs, x[1:3])

    _, y_none = load_image_folder(tmp_path, size=16, resize=20, class_index=None)
    assert y_none is None


def test_image_folder_resize_and_centre_crop(tmp_path: Path) -> None:
    # 40x20 image: left half black, right half white; short side 20 -> 10, so 20x10, crop 10x10
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 20))
    img.save(tmp_path / "a.png")
    x, y = load_image_folder(tmp_path, size=10, resize=10)
    assert x.shape == (1, 3, 10, 10) and y is None
    assert x[0, 0, 5, 0].item() < 0.05 and x[0, 0, 5, 9].item() > 0.95


def test_image_folder_subfolders_and_plain_names(tmp_path: Path) -> None:
    _write_png(tmp_path / "cls" / "b_dog" / "1.png", _colour(0))
    _write_png(tmp_path / "cls" / "a_cat" / "2.jpg", _colour(1))
    _write_png(tmp_path / "cls" / "a_cat" / "1.jpeg", _colour(2))
    x, y = load_image_folder(tmp_path / "cls", size=8, resize=8)
    assert x.shape == (3, 3, 8, 8)
    assert y is not None and y.tolist() == [0, 0, 1]

    _write_png(tmp_path / "plain" / "img1.png", _colour(0))
    _write_png(tmp_path / "plain" / "img0.png", _colour(1))
    x, y = load_image_folder(tmp_path / "plain", size=8, resize=8)
    assert y is None and [_image_index(img, 2) for img in x] == [1, 0]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")
    _write_png(tmp_path / "broken" / "n00000001_ok.png", _colour(0))
    (tmp_path / "broken" / "n00000002_bad.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match="n00000002_bad.png"):
        load_image_folder(tmp_path / "broken", size=8, resize=8)


# ------------------------------------------------------------------------------------------
# calibration / evaluation split
# ------------------------------------------------------------------------------------------


def _sample_folder(root: Path, n: int = 20) -> list[int]:
    """n solid-colour images, image i with WordNet id n{900-10*i}: sorted ids reverse the order."""
    wnids = [f"n{90000000 - 10 * i:08d}" for i in range(n)]
    for i, w in enumerate(wnids):
        _write_png(root / f"{w}_class{i}.JPEG".replace(".JPEG", ".png"), _colour(i), size=(12, 12))
    sorted_ids = sorted(wnids)
    return [sorted_ids.index(w) for w in wnids]  # global label of image i


def test_imagenet_sample_split_disjoint_and_global_labels(tmp_path: Path) -> None:
    n = 20
    label_of = _sample_folder(tmp_path, n)
    x_cal, x_ev, y_ev = imagenet_sample_split(tmp_path, n_calib=6, seed=0, size=8, resize=8)
    assert x_cal.shape == (6, 3, 8, 8) and x_ev.shape == (14, 3, 8, 8) and y_ev.shape == (14,)
    cal = [_image_index(img, n) for img in x_cal]
    ev = [_image_index(img, n) for img in x_ev]
    assert not set(cal) & set(ev)
    assert sorted(cal + ev) == list(range(n))
    assert y_ev.tolist() == [label_of[i] for i in ev]

    # deterministic, seed-dependent, consistent with the file-level split
    cal_f, ev_f, ev_labels = split_image_files(tmp_path, n_calib=6, seed=0)
    assert not set(cal_f) & set(ev_f) and len(cal_f) + len(ev_f) == n
    assert ev_labels == y_ev.tolist()
    assert split_image_files(tmp_path, n_calib=6, seed=0) == (cal_f, ev_f, ev_labels)
    assert split_image_files(tmp_path, n_calib=6, seed=1)[0] != cal_f
    files, labels = list_image_files(tmp_path)
    assert labels is not None
    assert ev_labels == [labels[files.index(f)] for f in ev_f]

    _, x_few, y_few = imagenet_sample_split(tmp_path, n_calib=6, n_eval=4, size=8, resize=8)
    assert x_few.shape[0] == 4 and set(y_few.tolist()) <= set(y_ev.tolist())
    x0, _, _ = imagenet_sample_split(tmp_path, n_calib=0, size=8, resize=8)
    assert x0.shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="n_calib"):
        imagenet_sample_split(tmp_path, n_calib=n)


def test_data_root_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAROUND_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv("ADAROUND_DATA")
    assert data_root().parts[-2:] == ("shared", "data")
