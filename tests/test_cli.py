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
