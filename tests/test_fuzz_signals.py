"""Fuzz: runs killed (SIGKILL), terminated (SIGTERM) and interrupted (SIGINT) through real
subprocesses, resumed from their checkpoint to the same file as an uninterrupted run, with
nothing left behind (no spill folder, no .tmp)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adaround.checkpoint import FILE
from adaround.cli import main

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
MODEL = "tiny_models:tiny_resnet"
# slow enough per layer (0.2-0.5 s) that a kill lands between checkpoints
LAYERWISE = ["--loss", "sampled", "--iters", "600", "--no-early-stop", "--lr", "0.01",
             "--batch-size", "16", "--memory-budget-mb", "0.01"]


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1",
            "TMPDIR": str(tmp_path / "tmp")}


def _argv(tmp_path: Path, options: list[str], out: str) -> list[str]:
    return ["-q", "quantize", MODEL, "--calib", str(tmp_path / "data.npz"), "--num-calib",
            "64", "--checkpoint", str(tmp_path / "ck"), "-o", str(tmp_path / out), *options]


def _start(tmp_path: Path, env: dict[str, str], options: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adaround", *_argv(tmp_path, options,
                                                                      "q.pt")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _units_done(folder: Path) -> int:
    try:
        return len(torch.load(folder / FILE, weights_only=False)["done"])
    except Exception:  # not written yet
        return 0


def _stop_after(proc: subprocess.Popen, folder: Path, units: int, sig: int
                ) -> tuple[int, str]:
    deadline = time.monotonic() + 60
    while _units_done(folder) < units:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in [*tmp_path.iterdir(), *(tmp_path / "tmp").iterdir()]
                  if p.name.endswith(".tmp") or p.name.startswith("adaround-spill-"))


def _reference(tmp_path: Path, options: list[str]) -> str:
    argv = _argv(tmp_path, options, "ref.pt")
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "ck-ref")
    assert main(argv) == 0
    return _sha(tmp_path / "ref.pt")


def test_killed_terminated_interrupted_then_resumed(tmp_path: Path, env) -> None:  # type: ignore[no-untyped-def]
    """One run stopped three times, at three points, by the three signals, then finished."""
    folder = tmp_path / "ck"
    proc = _start(tmp_path, env, LAYERWISE)
    assert _stop_after(proc, folder, 1, signal.SIGKILL)[0] == -signal.SIGKILL
    assert _units_done(folder) >= 1  # the checkpoint survived the kill
    proc = _start(tmp_path, env, LAYERWISE)
    code, err = _stop_after(proc, folder, 2, signal.SIGTERM)
    assert code == 143 and err.splitlines()[-1] == "adaround: terminated", err
    assert "left by an interrupted run" in err  # the killed run's spill folder went first
    assert _leftovers(tmp_path) == []  # and SIGTERM removed its own
    proc = _start(tmp_path, env, LAYERWISE)
    code, err = _stop_after(proc, folder, 3, signal.SIGINT)
    assert code == 130 and err.splitlines()[-1] == "adaround: interrupted", err
    assert _leftovers(tmp_path) == []
    proc = _start(tmp_path, env, LAYERWISE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert _sha(tmp_path / "q.pt") == _reference(tmp_path, LAYERWISE)
    assert not folder.exists() and _leftovers(tmp_path) == []


def test_sigint_while_starting_up(tmp_path: Path, env) -> None:  # type: ignore[no-untyped-def]
    for delay in (0.3, 1.0, 2.0, 4.0):  # while importing torch
        proc = _start(tmp_path, env, LAYERWISE)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if "init_import_site" not in err:
            break  # a loaded machine may still be in Python's own start-up: not ours, retry
    assert proc.returncode == 130 and "Traceback" not in err, err
