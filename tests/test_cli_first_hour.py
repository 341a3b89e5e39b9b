"""First-hour friction of the command line (issue 15): --quiet after the command, help texts,
evaluate's single result line, thread choice from the load, analyze's estimate and --lr."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from tiny_models import images, tiny_resnet

from adaround.analysis import AnalysisConfig, analyze
from adaround.cli import build_parser, main
from adaround.cli_env import choose_threads

MODEL = "tiny_models:tiny_resnet"


@pytest.fixture()
def data(tmp_path):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8),
             y=rng.integers(0, 4, 64))
    return path


def test_quiet_is_accepted_after_the_command(tmp_path, data, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q.pt"
    code = main(["quantize", MODEL, "--calib", str(data), "--rounding", "nearest",
                 "--num-calib", "32", "-o", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0 and out.exists()
    assert captured.err == ""  # no log lines, no progress bar
    assert main(["evaluate", MODEL, "--quantized", str(out), "--data", str(data), "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_evaluate_prints_its_result_once(data, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["evaluate", MODEL, "--data", str(data)]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert captured.out.count("top-1") == 1 and text.count("top-1") == 1


def _help(*command: str) -> str:
    parser = build_parser()
    if command:
        sub = next(a for a in parser._actions if a.dest == "command")
        parser = sub.choices[command[0]]  # type: ignore[index]
    return " ".join(parser.format_help().split())  # without the line wrapping


def test_help_texts() -> None:
    top = _help()
    for command in ("quantize", "evaluate", "analyze", "export", "demo"):
        assert command in top
    assert "Thin" not in top and "AIMET" in top
    quantize = _help("quantize")
    for text in ("nearest grid point", "calibration samples per optimisation step",
                 "same seed", "searches the scale"):
        assert text in quantize
    assert "one row each" in _help("demo")
    assert "3 / iters" in _help("analyze")


def test_threads_from_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (1.7, 1.0, 1.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert choose_threads() == 1  # one core is busy with other work
    monkeypatch.setattr("os.getloadavg", lambda: (0.1, 0.1, 0.1))
    assert choose_threads() == 2
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 9.0, 9.0))
    assert choose_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads() is None  # the user's setting wins


def test_analyze_says_how_long_it_takes_and_takes_lr(caplog: pytest.LogCaptureFixture) -> None:
    net, x = tiny_resnet(), images(64)
    with torch.no_grad():
        y = net(x).argmax(1)
    cfg = AnalysisConfig(bits=(4,), samples=10, iters=20, sweeps=2, hessian_samples=16,
                         all_layers=False, batch_size=16)
    with caplog.at_level(logging.INFO, logger="adaround"):
        analyze(net, x[:32], x[32:], y[32:], cfg)
    assert "one evaluation on 32 samples takes" in caplog.text
    assert "16 of them" in caplog.text  # 10 stochastic roundings + 6 methods
    assert "stochastic roundings scored" in caplog.text
    assert "set lr to about 0.15" in caplog.text  # iters=20 at lr 1e-3: the short-run warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adaround"):
        analyze(net, x[:32], x[32:], y[32:],
                AnalysisConfig(**{**cfg.to_dict(), "bits": (4,), "lr": 0.15}))
    assert "set lr" not in caplog.text
    assert cfg.quant_config(4).lr == 1e-3
    assert AnalysisConfig(lr=0.15).quant_config(4).lr == 0.15
