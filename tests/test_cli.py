import numpy as np
import pytest
import torch
from tiny_models import tiny_resnet

from adaround.cli import main

MODEL = "tiny_models:tiny_resnet"


@pytest.fixture()
def data(tmp_path):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.integers(0, 256, (96, 8, 8, 3), dtype=np.uint8),
             y=rng.integers(0, 4, 96))
    return path


def test_quantize_then_evaluate(tmp_path, data, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q.pt"
    code = main(["quantize", MODEL, "--calib", str(data), "--bits", "3", "--iters", "50",
                 "--batch-size", "16", "--num-calib", "64", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and out.exists()
    assert "quantized 5 layers" in captured.out
    assert "block.conv1 (W3): loss after relu nearest" in captured.err
    assert "rounded differently" in captured.err
    code = main(["--quiet", "evaluate", MODEL, "--quantized", str(out), "--data", str(data)])
    captured = capsys.readouterr()
    assert code == 0 and "top-1:" in captured.out and "(96 samples)" in captured.out
    assert captured.err == ""


def test_weights_option_and_mismatch(tmp_path, data, capsys) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "good.pt"
    torch.save(tiny_resnet(seed=3).state_dict(), good)
    assert main(["-q", "evaluate", MODEL, "--weights", str(good), "--data", str(data)]) == 0
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    code = main(["-q", "evaluate", MODEL, "--weights", str(bad), "--data", str(data)])
    assert code == 2
    assert "bad.pt" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["quantize", MODEL, "--calib", "{data}", "--bits", "9", "-o", "{tmp}/q.pt"],
     "weight_bits=9 is out of range"),
    (["quantize", MODEL, "--calib", "{tmp}/missing.npz", "-o", "{tmp}/q.pt"], "missing.npz"),
    (["quantize", "tiny_models", "--calib", "{data}", "-o", "{tmp}/q.pt"],
     "package.module:factory"),
    (["quantize", "no_such_module:f", "--calib", "{data}", "-o", "{tmp}/q.pt"],
     "cannot import"),
    (["evaluate", MODEL, "--quantized", "{tmp}/missing.pt", "--data", "{data}"], "missing.pt"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, data, capsys, argv, message) -> None:  # type: ignore[no-untyped-def]
    argv = [a.format(data=data, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "q.pt").exists()


def test_unknown_option_is_a_usage_error(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        main(["quantize", MODEL, "--calib", "x.npz", "-o", "q.pt", "--bitz", "4"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bitz" in capsys.readouterr().err


def test_fast_preset_and_options_beside_it(tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    from adaround.cli import build_parser, config_from_args
    from adaround.config import FAST_PRESET

    parser = build_parser()
    base = ["quantize", MODEL, "--calib", str(data), "-o", str(tmp_path / "q.pt")]
    plain = config_from_args(parser.parse_args(base))
    assert (plain.iters, plain.lr, plain.loss, plain.moment_positions) == (10000, 1e-3, "auto",
                                                                            None)
    every = config_from_args(parser.parse_args([*base, "--fast", "--moment-positions", "all"]))
    assert every.moment_positions is None  # beside --fast too, whose preset caps them
    fast = config_from_args(parser.parse_args([*base, "--fast"]))
    assert (fast.iters, fast.lr, fast.moment_positions) == (
        FAST_PRESET["iters"], FAST_PRESET["lr"], FAST_PRESET["moment_positions"])
    mixed = config_from_args(parser.parse_args([*base, "--fast", "--iters", "300",
                                                "--moment-positions", "1000"]))
    assert (mixed.iters, mixed.lr, mixed.moment_positions) == (300, FAST_PRESET["lr"], 1000)
    assert plain.step_precision == "auto"
    exact = config_from_args(parser.parse_args([*base, "--step-precision", "float32"]))
    assert exact.step_precision == "float32"
    # and the run itself: the preset quantizes (a few steps on the tiny model)
    out = tmp_path / "f.pt"
    assert main(["-q", "quantize", MODEL, "--calib", str(data), "--num-calib", "64", "--fast",
                 "--iters", "20", "-o", str(out)]) == 0 and out.exists()
