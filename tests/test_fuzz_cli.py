"""Fuzz: command-line arguments refused before any work, in one line with exit code 2."""

from __future__ import annotations

import numpy as np
import pytest
from fuzz_helpers import FIX

from adaround.cli import main

MODEL = "tiny_models:tiny_resnet"
MISSING = "{tmp}/no-such-data.npz"  # were the option checked late, this would fail first


@pytest.fixture()
def data(tmp_path):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8),
             y=rng.integers(0, 4, 64))
    (tmp_path / "afile").write_text("x")
    return path


def _quantize(*extra: str) -> list[str]:
    return ["quantize", MODEL, "--calib", MISSING, "-o", "{tmp}/q.pt", *extra]


CASES = [
    (["--threads", "-3", "demo"], "--threads -3"),
    (["--threads", "0", "demo"], "--threads 0"),
    (["demo", "--iters", "0"], "--iters 0"),
    (["demo", "--num-calib", "0"], "--num-calib 0"),
    (["demo", "--num-calib", "-1"], "--num-calib -1"),
    (["quantize", MODEL, "--calib", MISSING, "-o", "{tmp}"], "is a directory"),
    (["quantize", MODEL, "--calib", MISSING, "-o", "{tmp}/afile/q.pt"], "which is a file"),
    (_quantize("--num-calib", "0"), "--num-calib 0"),
    (_quantize("--calib-offset", "-1"), "--calib-offset -1"),
    (_quantize("--iters", "0"), "--iters 0"),
    (_quantize("--checkpoint", "{tmp}/afile/ck"), "which is a file"),
    (_quantize("--lr", "inf"), "lr=inf"),
    (_quantize("--lr", "nan"), "lr=nan"),
    (_quantize("--seed", str(2**70)), "seed="),
    (_quantize("--memory-budget-mb", "-5"), "memory_budget_mb"),
    (["quantize", "torch.nn:Linear", "--calib", MISSING, "-o", "{tmp}/q.pt"],
     "needs arguments"),
    (["quantize", "--hf-model", "{tmp}", "--calib-text", MISSING, "--checkpoint",
      "{tmp}/afile/ck", "-o", "{tmp}/q.pt"], "which is a file"),
    (["evaluate", MODEL, "--data", MISSING, "--limit", "0"], "--limit 0"),
    (["analyze", MODEL, "--calib", MISSING, "--data", MISSING, "--json", "{tmp}/afile/r.json"],
     "which is a file"),
    (["analyze", MODEL, "--calib", MISSING, "--data", MISSING, "--num-eval", "0"],
     "--num-eval 0"),
    (["export", MODEL, "--quantized", MISSING, "--format", "packed", "-o", "{tmp}"],
     "is a directory"),
    (["export", MODEL, "--quantized", MISSING, "--format", "encodings", "-o", "{tmp}/e.json",
      "--float-onnx", "{tmp}"], "is a directory"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:4]) for a, _ in CASES])
def test_refused_before_work_in_one_line(tmp_path, data, capsys, argv, message) -> None:  # type: ignore[no-untyped-def]
    code = main([a.format(tmp=tmp_path, data=data) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaround: error:"), err
    assert message in err and FIX.search(err), err
    assert "Traceback" not in err


def test_labels_out_of_range_exit_2(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((8, 8, 8, 3), np.uint8), y=np.full(8, 7))
    assert main(["-q", "evaluate", MODEL, "--data", str(path)]) == 2
    assert "labels span 7..7" in capsys.readouterr().err


def test_evaluate_warns_when_preprocessing_differs(tmp_path, data, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q.pt"
    assert main(["-q", "quantize", MODEL, "--calib", str(data), "--iters", "4",
                 "--batch-size", "16", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["-q", "evaluate", MODEL, "--quantized", str(out), "--data", str(data)]) == 0
    assert "unlike the calibration data" in capsys.readouterr().err


def test_checkpoint_folder_is_removed_after_the_output_is_written(tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    out, folder = tmp_path / "q.pt", tmp_path / "ck"
    assert main(["-q", "quantize", MODEL, "--calib", str(data), "--iters", "4",
                 "--batch-size", "16", "--checkpoint", str(folder), "-o", str(out)]) == 0
    assert out.exists() and not folder.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
