"""Every model people bring: the prepared float network equals the original, W8 nearest is
within float noise, and what cannot be handled is refused by name."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from pattern_models import (
    AuxHead,
    DataDependent,
    TokensAndMask,
    TracesDifferently,
    TwoInputs,
    TypeChecker,
    Versioned,
    WeightReader,
    intrinsic_net,
    norm_act_net,
    unfoldable_norm_net,
)
from torch import nn

import adaround
from adaround.api import prepare_float
from adaround.config import QuantConfig
from adaround.equivalence import first_difference, relative_error, run_outputs
from adaround.errors import ModelError
from adaround.nn.quant_layer import QuantLayer

W8 = QuantConfig(weight_bits=8, per_channel=True, rounding="nearest")


def _images(n: int = 16, size: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _error(model: nn.Module, other: nn.Module, x: torch.Tensor) -> float:
    return relative_error(run_outputs(model, x), run_outputs(other, x))


@pytest.mark.parametrize("make", [norm_act_net, intrinsic_net, WeightReader, Versioned])
def test_prepared_float_equals_original_and_w8_is_float_noise(make) -> None:  # type: ignore[no-untyped-def]
    model, x = make().eval(), _images()
    fp, _, folded = prepare_float(model, x, W8)
    assert _error(model, fp, x) < 1e-5
    qmodel = adaround.quantize(model, x, W8)
    # W8 on layers of 27-72 weights per channel: about 0.4 % weight noise
    assert _error(model, qmodel, x) < 1e-2
    if make in (norm_act_net, intrinsic_net):
        assert folded  # the norms were folded, not just left alone


def test_norm_with_activation_keeps_its_activation() -> None:
    """The regression of timm's BatchNormAct2d: folding replaced the module and dropped its
    SiLU (relative error ~1 on every timm efficient/mobile network)."""
    model, x = norm_act_net(), _images()
    fp, trace, folded = prepare_float(model, x, W8)
    assert folded["stem"] == "bn1" and folded["conv2"] == "bn2"
    assert type(fp.bn1).__name__ == "BatchNormAct2d"  # kept, its normalisation made identity
    info = {i.name: i for i in trace.layers}
    assert info["stem"].activation_name == "silu"  # seen through the neutral norm
    assert info["conv2"].activation_name == "relu"


def test_norm_that_cannot_be_folded_is_left_in_place(caplog) -> None:  # type: ignore[no-untyped-def]
    model, x = unfoldable_norm_net(), _images()
    with caplog.at_level(logging.WARNING, logger="adaround.api"):
        fp, _, folded = prepare_float(model, x, W8)
    assert folded == {"conv2": "bn2"}
    assert "bn" in caplog.text and "left unfolded" in caplog.text
    assert _error(model, fp, x) < 1e-5
    assert _error(model, adaround.quantize(model, x, W8), x) < 1e-2


def test_fold_bn_false_leaves_every_norm() -> None:
    model, x = norm_act_net(), _images()
    _, _, folded = prepare_float(model, x, QuantConfig(weight_bits=8, fold_bn=False))
    assert folded == {}


def test_model_code_that_reads_weights_sees_the_quantized_weight() -> None:
    model, x = WeightReader().eval(), _images()
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=3, rounding="nearest"))
    proj = qmodel.proj
    assert isinstance(proj, QuantLayer) and proj.in_features == 8
    torch.testing.assert_close(proj.weight, proj.quantized_weight())
    manual = proj.layer(x.new_zeros(1, 8))  # bias only
    torch.testing.assert_close(proj.bias, manual[0])


def test_forward_that_checks_layer_types_is_refused_by_name() -> None:
    model, x = TypeChecker().eval(), _images()
    with pytest.raises(ModelError, match=r"proj \(QuantLayer\).*exclude"):
        adaround.quantize(model, x, W8)
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=8, exclude=("proj",),
                                                     rounding="nearest"))
    assert _error(model, qmodel, x) < 1e-2


def test_first_difference_names_the_module() -> None:
    model = intrinsic_net()
    other = intrinsic_net()
    with torch.no_grad():
        other[1][0].weight.mul_(1.5)  # the conv inside the second fused block
    diff = first_difference(model, other, _images())
    assert diff is not None and diff.name == "1.0" and diff.kind == "Conv2d"
    assert first_difference(model, intrinsic_net(), _images()) is None


def test_data_dependent_branch_is_named() -> None:
    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.cat([torch.randn(32, 3, 8, 8) + 3, torch.randn(32, 3, 8, 8) - 3])
    with torch.no_grad():
        model.conv.bias.zero_()
        model.conv.weight.abs_()  # mean of conv(x) follows the sign of x
    cfg = QuantConfig(weight_bits=4, iters=2, batch_size=8, loss="sampled")
    with pytest.raises(ModelError, match=r"extra \(Conv2d\) is not called for every calibration"):
        adaround.quantize(model, x, cfg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_is_quantized_in_float32_and_returned_in_its_dtype(dtype) -> None:  # type: ignore[no-untyped-def]
    model, x = norm_act_net().to(dtype), _images().to(dtype)
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=8, iters=4, batch_size=8))
    assert qmodel.head.scale.dtype == dtype
    out = qmodel(x)
    assert out.dtype == dtype
    ref = norm_act_net()(x.float())
    assert relative_error([ref], [out.float()]) < 3e-2  # half precision noise


def test_save_load_keeps_the_modules_state_dict_versions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, x = Versioned().eval(), _images()
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=4, rounding="nearest"))
    adaround.save(qmodel, tmp_path / "v.safetensors")
    loaded = adaround.load(tmp_path / "v.safetensors", Versioned().eval())
    assert torch.equal(loaded(x), qmodel(x))


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))), "TorchScript"),
    (lambda: nn.Conv2d(3, 4, 3, device="meta"), "meta device"),
    (lambda: {"conv": nn.Conv2d(3, 4, 3)}, "not a torch.nn.Module"),
])
def test_models_that_cannot_be_quantized_are_refused(bad, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelError, match=match):
        adaround.quantize(bad(), _images(), W8)


def test_already_quantized_model_is_refused() -> None:
    model, x = WeightReader().eval(), _images()
    qmodel = adaround.quantize(model, x, W8)
    with pytest.raises(ModelError, match="already quantized"):
        adaround.quantize(qmodel, x, W8)


def test_two_input_model_from_tuple_batches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = TwoInputs().eval()
    images, extra = _images(40), torch.randn(40, 5)
    batches = [(images[i:i + 8], extra[i:i + 8], torch.zeros(8)) for i in range(0, 40, 8)]
    cfg = QuantConfig(weight_bits=4, iters=20, batch_size=8, lr=0.1)
    qmodel = adaround.quantize(model, batches, cfg)  # the third element (labels) is ignored
    assert isinstance(qmodel, TwoInputs) and isinstance(qmodel.conv, QuantLayer)
    assert set(qmodel.adaround_meta["layers"]) == {"conv", "side", "head"}
    assert qmodel.adaround_meta["folded"] == {"conv": "bn"}
    assert {r.name for r in qmodel.adaround_report} == {"conv", "side", "head"}
    ref, out = model(images, extra), qmodel(images, extra)
    assert 0 < relative_error([ref], [out]) < 0.2
    adaround.save(qmodel, tmp_path / "two.safetensors")
    loaded = adaround.load(tmp_path / "two.safetensors", TwoInputs().eval())
    assert torch.equal(loaded(images, extra), out)


def test_keyword_inputs_from_a_dict() -> None:
    torch.manual_seed(0)
    model = TokensAndMask().eval()
    ids = torch.randint(0, 20, (32, 6))
    mask = torch.ones(32, 6, dtype=torch.long)
    calib = {"input_ids": ids, "attention_mask": mask}
    qmodel = adaround.quantize(model, calib, W8)
    ref, out = model(ids, attention_mask=mask), qmodel(ids, attention_mask=mask)
    assert relative_error(list(ref.values()), list(out.values())) < 1e-2
    assert set(qmodel.adaround_meta["layers"]) == {"fc1", "fc2"}


def test_layers_that_do_not_run_in_eval_mode_export(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ort = pytest.importorskip("onnxruntime")
    model, x = AuxHead().eval(), _images()
    qmodel = adaround.quantize(model, x, W8)
    assert qmodel.aux.mode == "quantized"  # rounded to nearest, never called
    path = adaround.export_onnx(qmodel, x[:1], tmp_path / "aux.onnx")
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), qmodel(x), rtol=1e-4, atol=1e-5)


def test_hooks_on_a_layer_still_run_once_it_is_quantized() -> None:
    model, x = WeightReader().eval(), _images()
    seen: list[torch.Tensor] = []
    model.conv.register_forward_hook(lambda _m, _a, out: seen.append(out))
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=4, rounding="nearest"))
    seen.clear()
    out = qmodel(x)
    assert len(seen) == 1  # the user's feature hook fired on the quantized conv
    expected = F.conv2d(x, qmodel.conv.quantized_weight(), qmodel.conv.bias, padding=1)
    torch.testing.assert_close(seen[0], expected)
    assert out.shape == (16, 4)


def test_model_code_that_reads_weights_runs_in_the_one_pass_engine() -> None:
    """edgenext's regression: fx traced `self.conv.weight` as `conv.layer.weight`, which the FP
    stream does not have (AttributeError) and which is the float weight in the quantized one."""
    from adaround.api import float_copy
    from adaround.prepare import plan_layers, swap_in_quant_layers
    from adaround.reconstruct.stream import GraphEngine, RerunEngine, make_engine

    model, x = WeightReader().eval(), _images(32)
    cfg = QuantConfig(weight_bits=3, iters=10, batch_size=8)
    fp, trace, _ = prepare_float(model, x, cfg)
    plans = plan_layers(fp, trace, cfg)
    qmodel = swap_in_quant_layers(float_copy(fp), plans, cfg)
    chunks = list(x.split(16))
    graph = make_engine(fp, qmodel, chunks, [p.name for p in plans])
    assert isinstance(graph, GraphEngine)
    qmodel.conv.set_codes(qmodel.conv.nearest_codes())  # the stream after conv is quantized
    xq_graph, _ = graph.layer_data("proj", None)
    xq_rerun, _ = RerunEngine(fp, qmodel, chunks).layer_data("proj", None)
    torch.testing.assert_close(xq_graph, xq_rerun)
    assert relative_error([model(x)], [adaround.quantize(model, x, cfg)(x)]) < 0.2


def test_a_graph_that_computes_otherwise_than_eager_is_not_used(caplog) -> None:  # type: ignore[no-untyped-def]
    from adaround.reconstruct.stream import RerunEngine, make_engine

    model, x = TracesDifferently().eval(), _images(32)
    with caplog.at_level(logging.WARNING):
        engine = make_engine(model, model, list(x.split(16)), ["conv", "head"])
    assert isinstance(engine, RerunEngine)
    assert "computes other outputs than its forward" in caplog.text


def test_a_list_of_single_samples_gets_the_fix() -> None:
    samples = list(_images(8))  # [3, 12, 12] each: concatenated to [24, 12, 12]
    with pytest.raises(adaround.AdaRoundError, match=r"torch.stack"):
        adaround.quantize(WeightReader().eval(), samples, W8)


def test_fold_within_the_networks_own_float_noise_is_accepted(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """Inception v3 (random weights, 96x96) folds exactly yet misses 1e-4 by float32 rounding
    alone: a rewrite passes within NOISE_FACTOR of the error one-ulp parameter changes give.
    With the fixed tolerance at 0 here, only that noise test can accept a fold."""
    import adaround.api as api

    monkeypatch.setattr(api, "TOLERANCE", 0.0)
    model, x = norm_act_net(), _images()
    _, _, folded = prepare_float(model, x, W8)
    assert folded == {"stem": "bn1", "conv2": "bn2"}  # accepted as float noise
    with caplog.at_level(logging.WARNING, logger="adaround.api"):
        _, _, folded = prepare_float(unfoldable_norm_net(), x, W8)
    assert "bn" not in folded.values() and "left unfolded" in caplog.text  # O(1): still caught
