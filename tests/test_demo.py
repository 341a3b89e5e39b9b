import pytest

from adaround.cli import main


def test_demo_prints_fp_nearest_and_adaround_rows(capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("adaround.data.fashion_mnist")
    from adaround.data.fashion_mnist import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST absent: {exc}")
    assert main(["-q", "demo", "--bits", "3", "--iters", "30", "--num-calib", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["weights", "rounding", "top-1", "%", "time", "s"]
    fp, nearest, ada = (line.split() for line in lines[1:])
    assert fp[0] == "FP32" and float(fp[2]) > 85
    assert nearest[:3] == ["W3A32", "per-tensor", "nearest"]
    assert ada[:3] == ["W3A32", "per-tensor", "adaround"]
    assert 10 < float(nearest[3]) < float(fp[2])
