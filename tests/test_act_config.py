import pytest
import torch

from adaround import ConfigError, QuantConfig
from adaround.cli import build_parser, config_from_args


def test_only_act_bits_gives_the_papers_w4a8_settings() -> None:
    cfg = QuantConfig(act_bits=8)
    assert (cfg.unit, cfg.act_range, cfg.learn_act_scale, cfg.qdrop, cfg.fisher) == (
        "layer", "minmax", False, None, False)
    assert cfg.input_act_bits is None and cfg.last_act_bits is None  # = act_bits
    assert QuantConfig().act_bits is None  # weights only by default


@pytest.mark.parametrize("method, unit, act_range, learn, qdrop", [
    ("adaround", "layer", "minmax", False, None),
    ("brecq", "block", "mse", True, None),
    ("qdrop", "block", "mse", True, 0.5),
])
def test_methods_are_shorthand_for_the_same_options(method, unit, act_range, learn, qdrop) -> None:  # type: ignore[no-untyped-def]
    cfg = QuantConfig(act_bits=4, method=method)
    assert (cfg.unit, cfg.act_range, cfg.learn_act_scale, cfg.qdrop) == (unit, act_range, learn,
                                                                         qdrop)
    explicit = QuantConfig(act_bits=4, unit=unit, act_range=act_range, learn_act_scale=learn,
                           qdrop=qdrop)
    assert {k: v for k, v in explicit.to_dict().items() if k != "method"} == {
        k: v for k, v in cfg.to_dict().items() if k != "method"}
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_method_values_can_be_refined_where_they_do_not_contradict() -> None:
    assert QuantConfig(act_bits=4, method="qdrop", qdrop=0.7).qdrop == 0.7
    assert QuantConfig(act_bits=4, method="brecq", act_range="percentile").act_range == "percentile"
    assert QuantConfig(act_bits=4, method="brecq", fisher=True, blocks=("layer1.*",)).blocks == (
        "layer1.*",)
    brecq_weights_only = QuantConfig(method="brecq")
    assert brecq_weights_only.unit == "block" and not brecq_weights_only.learn_act_scale


@pytest.mark.parametrize("kwargs, fix", [
    (dict(qdrop=0.5), "set act_bits"),
    (dict(learn_act_scale=True), "set act_bits"),
    (dict(act_range="mse"), "set act_bits"),
    (dict(input_act_bits=8), "set act_bits"),
    (dict(method="qdrop"), "set act_bits"),
    (dict(act_bits=4, method="brecq", qdrop=0.5), "use method='qdrop'"),
    (dict(act_bits=4, method="adaround", unit="block"), "drop one of the two"),
    (dict(act_bits=4, method="brecq", learn_act_scale=False), "drop one of the two"),
    (dict(act_bits=4, fisher=True), "set unit='block'"),
    (dict(act_bits=4, blocks=("layer1.0",)), "set unit='block'"),
    (dict(act_bits=4, method="qdrop", rounding="nearest"), "use rounding='adaround'"),
    (dict(act_bits=4, method="brecq", loss="quadratic"), "use loss='sampled'"),
    (dict(act_bits=4, qdrop=1.5), "in (0, 1]"),
    (dict(act_bits=4, qdrop=0.0), "> 0"),
    (dict(act_bits=1), "between 2 and 8"),
    (dict(act_bits=4, last_act_bits=16), "between 2 and 8"),
    (dict(act_bits=4, act_range="max"), "choose one of minmax, mse, percentile"),
    (dict(act_bits=4, unit="network"), "choose one of layer, block"),
    (dict(act_bits=4, method="gptq"), "choose one of adaround, brecq, qdrop"),
    (dict(act_bits=4, act_percentile=20.0), "(50, 100]"),
])
def test_bad_combinations_are_refused_with_the_fix(kwargs, fix) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        QuantConfig(**kwargs)
    assert fix in str(info.value)


def _cfg(*options: str) -> QuantConfig:
    args = build_parser().parse_args(["quantize", "m:f", "--calib", "c", "-o", "o", *options])
    return config_from_args(args)


def test_cli_options_reach_the_config() -> None:
    cfg = _cfg("--act-bits", "4", "--first-last-act-bits", "8", "--method", "qdrop",
               "--qdrop", "0.3", "--block", "layer1.*", "--block", "layer2.*", "--fisher",
               "--act-lr", "1e-4")
    assert (cfg.act_bits, cfg.input_act_bits, cfg.last_act_bits) == (4, 8, 8)
    assert (cfg.unit, cfg.qdrop, cfg.fisher, cfg.act_lr) == ("block", 0.3, True, 1e-4)
    assert cfg.blocks == ("layer1.*", "layer2.*") and cfg.learn_act_scale
    cfg = _cfg("--act-bits", "4", "--qdrop", "--fixed-act-scale", "--last-act-bits", "6")
    assert (cfg.unit, cfg.qdrop, cfg.learn_act_scale, cfg.last_act_bits) == ("layer", 0.5, False,
                                                                             6)
    assert _cfg().act_bits is None and _cfg().unit == "layer"


def test_cli_refuses_a_bad_combination_with_exit_code_2(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from adaround.cli import main

    calib = tmp_path / "c.pt"
    torch.save(torch.randn(8, 3, 8, 8), calib)
    code = main(["quantize", "adaround.models.cifar_resnet:resnet20", "--calib", str(calib),
                 "-o", str(tmp_path / "o"), "--act-bits", "4", "--fisher"])
    assert code == 2 and "set unit='block'" in capsys.readouterr().err
