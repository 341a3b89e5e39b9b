"""The ablation runner, its table and plot, and `adaround analyze`, on a tiny network."""

import json

import numpy as np
import pytest
import torch
from tiny_models import images, tiny_resnet

from adaround.analysis import (
    Ablation,
    AnalysisConfig,
    analyze,
    format_summary,
    format_table,
)
from adaround.analysis.layerwise import quantize_layerwise
from adaround.analysis.report import spearman
from adaround.api import prepare_float
from adaround.cli import main
from adaround.errors import ConfigError
from adaround.nn.quant_layer import QuantLayer
from adaround.prepare import plan_layers

MODEL = "tiny_models:tiny_resnet"
SMALL = dict(samples=6, iters=60, sweeps=10, hessian_samples=32, all_layers_iters=20,
             all_layers_sweeps=2, batch_size=16)


@pytest.fixture(scope="module")
def ablations():  # type: ignore[no-untyped-def]
    net = tiny_resnet()
    x = images(96)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::3] = (y[::3] + 1) % 4  # some errors, so accuracy can move both ways
    cfg = AnalysisConfig(bits=(4, 2), **SMALL)
    return analyze(net, x[:48], x[48:], y[48:], cfg, calib_labels=y[:48], name="tiny")


def test_every_method_is_scored_on_the_same_grid(ablations) -> None:  # type: ignore[no-untyped-def]
    assert [a.bits for a in ablations] == [4, 2]
    for a in ablations:
        m = a.methods
        assert a.layer == "stem" and a.weights == 8 * 3 * 9
        assert set(m) == {"nearest", "ceil", "floor", "stochastic_best", "qubo_task",
                          "qubo_local", "relaxation"}
        assert len(a.stochastic) == 6 and m["nearest"].changed == 0.0
        # each QUBO solver starts from nearest and can only improve its own objective
        assert m["qubo_task"].task_qubo <= m["nearest"].task_qubo
        assert m["qubo_local"].local_qubo <= m["nearest"].local_qubo
        assert m["ceil"].local_qubo > m["nearest"].local_qubo
        assert m["stochastic_best"].task_loss == min(r.task_loss for r in a.stochastic)
        assert set(a.all_layers) == {"nearest", "qubo_local", "relaxation"}
        assert all(0 <= v <= 100 for v in a.all_layers.values())


def test_all_layers_models_use_each_bit_width() -> None:
    net = tiny_resnet()
    x = images(32)
    cfg = AnalysisConfig(bits=(4, 2), **SMALL)
    fp, trace, _ = prepare_float(net, x, cfg.quant_config(4))
    plans = plan_layers(fp, trace, cfg.quant_config(4))
    models = quantize_layerwise(fp, plans, x, cfg, torch.Generator().manual_seed(0))
    for bits in (4, 2):
        for method in ("nearest", "qubo_local", "relaxation"):
            layers = [m for m in models[bits][method].modules() if isinstance(m, QuantLayer)]
            assert len(layers) == len(plans) and all(q.bits == bits for q in layers)
            assert all(q.mode == "quantized" for q in layers)


def test_table_summary_and_json(ablations, tmp_path) -> None:  # type: ignore[no-untyped-def]
    table = format_table(ablations[0])
    for row in ("| nearest |", "| ceil |", "| floor |", "stochastic, mean ± std of 6",
                "best of 6 by calibration task loss", "samples beating nearest",
                "QUBO, task-loss Hessian", "QUBO, local MSE", "continuous relaxation"):
        assert row in table
    assert "tiny W4 | tiny W2" in format_summary(ablations)
    saved = json.loads(json.dumps([a.to_dict() for a in ablations]))
    assert format_table(Ablation.from_dict(saved[0])) == table


def test_plot_is_written(ablations, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    from adaround.analysis.plot import plot_qubo_vs_accuracy

    path = plot_qubo_vs_accuracy(ablations[0], tmp_path / "fig.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_spearman_handles_ties() -> None:
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_bad_settings_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="samples=1 is out of range"):
        AnalysisConfig(samples=1)
    with pytest.raises(ConfigError, match="choose one of"):
        AnalysisConfig(hessian="diagonal")
    net = tiny_resnet()
    with pytest.raises(ConfigError, match="choose one of: stem"):
        analyze(net, images(32), images(8), torch.zeros(8, dtype=torch.long),
                AnalysisConfig(layer="nope", **SMALL))


@pytest.fixture()
def data(tmp_path):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.integers(0, 256, (80, 8, 8, 3), dtype=np.uint8),
             y=rng.integers(0, 4, 80))
    return path


def test_cli_analyze_prints_the_table_and_writes_plot_and_json(tmp_path, data, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    out = tmp_path / "out.json"
    code = main(["-q", "analyze", MODEL, "--calib", str(data), "--data", str(data),
                 "--num-calib", "48", "--num-eval", "32", "--bits", "3", "--samples", "4",
                 "--iters", "20", "--sweeps", "4", "--hessian-samples", "16",
                 "--no-all-layers", "--plot-dir", str(tmp_path / "plots"), "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "layer `stem` (216 weights), W3" in captured.out
    assert "QUBO, local MSE" in captured.out
    assert list((tmp_path / "plots").glob("*.png"))
    saved = json.loads(out.read_text())
    assert saved[0]["bits"] == 3 and len(saved[0]["stochastic"]) == 4


def test_cli_analyze_bad_layer_exits_2(data, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["-q", "analyze", MODEL, "--calib", str(data), "--data", str(data),
                 "--layer", "nope", "--samples", "2", "--no-all-layers"])
    assert code == 2
    assert "layer='nope'" in capsys.readouterr().err
